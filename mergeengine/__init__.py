"""mergeengine: merge fine-tuned LLMs from shareable YAML recipes.

The pipeline, one module or folder per stage::

    recipe YAML -> recipe/ (pydantic) -> graph/steps.py (step DAG) -> graph/plan.py (tensor tasks)
    -> executor.py (lazy, per tensor) -> io/writer.py (sharded safetensors folder)
"""

__version__ = "0.1.0"

"""Serving: an OpenAI-compatible server (`glm-kernels serve`) with continuous batching over many P-Tuning
prefixes sharing one base model, the original `api.py` route and a web chat page.

    engine = Engine(model, tokenizer, {"base": base_prefix("base", model),
                                       "adgen": load_prefix("adgen", "output/adgen-pt-128", model)})
    app = create_app(engine)          # FastAPI; uvicorn.run(app, host="127.0.0.1", port=8000)

`engine.py` schedules, `sampling.py` picks tokens, `text.py` builds prompts and streams text,
`prefixes.py` loads P-Tuning checkpoints, `app.py` is the HTTP layer, `cli.py` the command.
"""
from .engine import Engine, Event, QueueFull, SamplingParams, UnknownModel
from .prefixes import Prefix, base_prefix, load_prefix

__all__ = ["Engine", "Event", "Prefix", "QueueFull", "SamplingParams", "UnknownModel", "base_prefix",
           "load_prefix", "create_app"]


def create_app(engine, timeout: float | None = 600.0):
    """The FastAPI app serving `engine` (imports FastAPI only when called: `pip install glm_kernels[serve]`)."""
    from .app import create_app as _create_app

    return _create_app(engine, timeout)

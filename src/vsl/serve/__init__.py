"""``vsl serve``: a search page and a JSON API over an index (:mod:`.app`), with micro-batched
searches on a thread pool (:mod:`.batching`), run by uvicorn on loopback (:mod:`.server`); with no
index, the demo's index, built once and cached (:mod:`.demo`)."""
from .app import create_app
from .server import serve

__all__ = ["create_app", "serve"]

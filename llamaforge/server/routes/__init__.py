"""The app's routes, one FastAPI `APIRouter` per area; `create_app` (server/app.py) includes them all."""

from llamaforge.server.routes import adapters, embeddings, generate, metrics, models, ollama, tokenize

ROUTERS = [models.router, generate.router, embeddings.router, tokenize.router, metrics.router, ollama.router,
           adapters.router]

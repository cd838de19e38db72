"""The HTTP edge: an OpenAI-compatible API over the inference service, agent runs as server-sent events, and the web
console, in one process behind the mesh's authentication."""

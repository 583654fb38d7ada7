"""The HTTP layer: OpenAI-compatible wire types, routes and error mapping. No engine logic here."""

from serving.app import create_app

__all__ = ["create_app"]

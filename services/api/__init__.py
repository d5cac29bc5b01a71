"""The status and control service: a FastAPI app over run directories.

``services.api.control`` (stop requests, the token) is light and is what the training loop
imports; ``services.api.app`` builds the FastAPI application and imports the web stack.
"""

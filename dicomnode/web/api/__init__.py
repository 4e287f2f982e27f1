"""REST API routers (mounted under /api by dicomnode.web.app)."""

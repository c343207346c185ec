"""HTTP routes of the pack under /pp/ (ComfyUI mirrors them under /api/pp/).  GET only
reads; anything that changes state is a POST."""
from __future__ import annotations

from aiohttp import web
from server import PromptServer

from ..pp_runtime.group import shared_groups

routes = PromptServer.instance.routes


@routes.get("/pp/status")
async def pp_status(request):
    groups = [g.status() for g in shared_groups()]
    return web.json_response({"state": "not started" if not groups else "started", "groups": groups})

"""The key under which a worker keeps a placed stage.
"""
from __future__ import annotations

import json




def placement_key(job: dict) -> str:
    return json.dumps([job["model"], job["split"], job["layout"]], sort_keys=True)

"""An example tokenman plugin: tags every request with its tokenman project (the
X-Tokenman-Project header), so the provider's own usage logs can be split by project too.

Enable it in the config:
    [plugins]
    enabled = true
    paths = ["examples/tag_requests.py"]     # a file, or a directory of plugin files

A plugin module lists its pipeline stages in STAGES and may define hook functions
request_start(ctx), request_complete(ctx) and request_error(ctx). A stage has the interface of
tokenman's own stages: a `name` and `request(ctx)` (plain or `async`) that may change `ctx.obj`
(marking changed top-level members in `ctx.changes`) or return a reply, and optionally
`__init__(cfg, **services)`, `response`, `stream_event`, `finish` and `close` (a class that does
not derive from tokenman's Stage gets its defaults). Errors in a plugin are logged and contained.
"""


class TagRequests:
    name = "tag_requests"
    fails_closed = False   # an error here lets the request through untouched
    runs_on_hit = False

    def __init__(self, cfg, **services):
        self.cfg = cfg

    def request(self, ctx):  # `async def` too, for a stage that has to wait for something
        obj = ctx.obj
        if ctx.api == "anthropic":
            metadata = dict(obj.get("metadata") or {})
            if "user_id" not in metadata:
                metadata["user_id"] = ctx.project
                obj["metadata"] = ctx.changes["metadata"] = metadata
        elif "user" not in obj:
            obj["user"] = ctx.changes["user"] = ctx.project
        return None

    def response(self, ctx, body):
        return body

    def stream_event(self, ctx, event):
        return event

    def finish(self, ctx):
        pass

    def close(self):
        pass


COMPLETED = {"requests": 0}


def request_complete(ctx):
    COMPLETED["requests"] += 1


STAGES = [TagRequests]

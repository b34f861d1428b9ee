"""python-socketio on aiohttp, doing what the benchmarks ask of every peer:
rooms broadcast (``subscribe`` joins a room, ``publish`` emits to it) and
call/ack (``call`` acknowledges with its argument).  Run by the benchmarks
from the socket.io virtual environment: ``python sio_server.py PORT``."""

import sys

import socketio
from aiohttp import web

sio = socketio.AsyncServer(async_mode="aiohttp", cors_allowed_origins="*", logger=False, engineio_logger=False)
app = web.Application()
sio.attach(app)


@sio.on("subscribe")
async def subscribe(sid, channel):
    await sio.enter_room(sid, channel)
    return {"offset": 0}


@sio.on("publish")
async def publish(sid, msg):
    await sio.emit("event", msg["data"], room=msg["channel"])


@sio.on("call")
async def call(sid, value):
    return value


if __name__ == "__main__":
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)

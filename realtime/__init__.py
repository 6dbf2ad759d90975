"""realtime: a real-time WebSocket server (Socket.IO v5) on gevent, Flask-SocketIO and Redis."""

__version__ = "0.1.0"

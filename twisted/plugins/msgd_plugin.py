from twisted.application.service import ServiceMaker

msgd = ServiceMaker(
    "msgd",
    "msgd.tap",
    "A node serving application modules over WebSocket, JSON-RPC, XML-RPC, SOAP, STOMP and PB",
    "msgd",
)

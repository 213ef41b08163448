"""MQTT over WebSocket with Eclipse Paho (paho-mqtt 2.x,
transport="websockets") against ferrymq.

Usage: python3 paho_ws.py HOST PORT PATH [CA_FILE]
Over MQTT 3.1.1 and then 5.0: subscribe at QoS 1, publish COUNT messages
at QoS 1, expect them back in order at QoS 1. With CA_FILE the connection
is WebSocket over TLS verified against that CA. Exits 0 when every
expectation holds, 1 (with the reason on stderr) otherwise.
"""

import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

WAIT = 10.0
COUNT = 20


def fail(message):
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def exchange(host, port, path, ca, protocol):
    client_id = f"paho-ws-{protocol}"
    topic = f"ws/{client_id}"
    connected = threading.Event()
    subscribed = threading.Event()
    done = threading.Event()
    received = []
    errors = []

    def on_connect(client, userdata, flags, reason, properties):
        if reason.is_failure:
            errors.append(f"CONNACK {reason}")
        connected.set()

    def on_subscribe(client, userdata, mid, reasons, properties):
        if [int(r.value) for r in reasons] != [1]:
            errors.append(f"SUBACK {reasons}")
        subscribed.set()

    def on_message(client, userdata, message):
        if message.qos != 1:
            errors.append(f"message at QoS {message.qos}")
        received.append(message.payload.decode())
        if len(received) == COUNT:
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=protocol, transport="websockets")
    client.ws_set_options(path=path)
    if ca:
        client.tls_set(ca_certs=ca)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(host, port, keepalive=30)
    client.loop_start()
    try:
        if not connected.wait(WAIT):
            fail(f"{client_id}: no CONNACK")
        client.subscribe(topic, qos=1)
        if not subscribed.wait(WAIT):
            fail(f"{client_id}: no SUBACK")
        for i in range(COUNT):
            info = client.publish(topic, f"m{i}", qos=1)
            info.wait_for_publish(WAIT)
            if not info.is_published():
                fail(f"{client_id}: m{i} not acknowledged")
        if not done.wait(WAIT):
            fail(f"{client_id}: received {received}")
        expected = [f"m{i}" for i in range(COUNT)]
        if received != expected:
            fail(f"{client_id}: received {received}")
        if errors:
            fail(f"{client_id}: {errors}")
    finally:
        client.disconnect()
        client.loop_stop()


def main():
    host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ca = sys.argv[4] if len(sys.argv) > 4 else None
    for protocol in (mqtt.MQTTv311, mqtt.MQTTv5):
        exchange(host, port, path, ca, protocol)
    print("ok")


if __name__ == "__main__":
    main()

"""Checks ferrymq with an independent client: Eclipse Paho (paho-mqtt 2.x).

Usage: python3 paho_check.py HOST PORT
Runs the same scenario over MQTT 3.1.1 and 5.0; exits 0 when every
expectation holds, 1 (with the reason on stderr) otherwise.
"""

import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

WAIT = 5.0


class Probe:
    """A paho client that records what it receives."""

    def __init__(self, host, port, client_id, protocol, keepalive=30):
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.published = threading.Event()
        self.connack = None
        self.granted = None
        self.messages = []
        self.lock = threading.Lock()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        if protocol == mqtt.MQTTv5:
            self.client.connect(host, port, keepalive=keepalive, clean_start=True)
        else:
            self.client.connect(host, port, keepalive=keepalive)
        self.client.loop_start()
        expect(self.connected.wait(WAIT), f"{client_id}: no CONNACK")

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack = (reason_code, properties)
        self.connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self.granted = reason_codes
        self.subscribed.set()

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append((msg.topic, msg.payload.decode()))

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self.published.set()

    def subscribe(self, filters):
        self.subscribed.clear()
        self.client.subscribe([(f, 0) for f in filters])
        expect(self.subscribed.wait(WAIT), "no SUBACK")
        return self.granted

    def wait_messages(self, n):
        deadline = time.time() + WAIT
        while time.time() < deadline:
            with self.lock:
                if len(self.messages) >= n:
                    return list(self.messages)
            time.sleep(0.01)
        with self.lock:
            fail(f"expected {n} messages, got {self.messages}")

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def expect(condition, message):
    if not condition:
        fail(message)


def fail(message):
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def scenario(host, port, protocol, tag):
    sub = Probe(host, port, f"paho-sub-{tag}", protocol)
    granted = sub.subscribe(["paho/+/c", "paho/#", "#"])
    expect(len(granted) == 3 and all(int(g.value if hasattr(g, "value") else g) == 0 for g in granted),
           f"unexpected SUBACK {granted}")
    if protocol == mqtt.MQTTv5:
        rc, props = sub.connack
        expect(rc == 0, f"CONNACK {rc}")
        expect(getattr(props, "ReceiveMaximum", None) == 1024, f"CONNACK properties {props}")
        expect(getattr(props, "MaximumPacketSize", None) == 1048576, f"CONNACK properties {props}")

    # Keep alive 0 is accepted.
    pub = Probe(host, port, f"paho-pub-{tag}", protocol, keepalive=0)
    for topic, payload in [("paho/b/c", "1"), ("$SYS/paho", "2"), ("other", "3")]:
        pub.client.publish(topic, payload, qos=0)
    # QoS 1 is acknowledged.
    pub.published.clear()
    info = pub.client.publish("paho/q1", "4", qos=1)
    expect(pub.published.wait(WAIT), "no PUBACK for QoS 1")
    info.wait_for_publish(WAIT)

    got = sub.wait_messages(3)
    time.sleep(0.3)
    with sub.lock:
        got = list(sub.messages)
    # One delivery per message despite overlapping filters; `#` skips `$SYS`.
    expect(got == [("paho/b/c", "1"), ("other", "3"), ("paho/q1", "4")], f"received {got}")
    sub.close()
    pub.close()


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    scenario(host, port, mqtt.MQTTv311, "311")
    scenario(host, port, mqtt.MQTTv5, "5")
    print("ok")


if __name__ == "__main__":
    main()

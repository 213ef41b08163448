"""Checks ferrymq's broker core with an independent client: Eclipse Paho
(paho-mqtt 2.x).

Usage: python3 paho_core.py HOST PORT SCENARIO
SCENARIO is one of: persistent, qos2, retained, will, order, overlap.
Each scenario runs over MQTT 3.1.1 and then 5.0 against the same broker
(client ids differ per version; what a run leaves retained it clears).
Exits 0 when every expectation holds, 1 (with the reason on stderr)
otherwise.
"""

import socket
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

# How long to wait for something that must happen.
WAIT = 5.0
# How long to wait to be sure something does not happen.
QUIET = 0.5

V311 = mqtt.MQTTv311
V5 = mqtt.MQTTv5


def fail(message):
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def expect(condition, message):
    if not condition:
        fail(message)


def code(value):
    """A reason code (paho ReasonCode or int) as an int."""
    return int(value.value if hasattr(value, "value") else value)


class Probe:
    """A paho client on its own network thread that records what it gets.

    Messages are recorded as (topic, payload, qos, retain) tuples.
    """

    def __init__(self, host, port, client_id, protocol, clean=True, expiry=None,
                 will=None, keepalive=30, inflight=None):
        self.client_id = client_id
        self.protocol = protocol
        kwargs = {}
        if protocol == V311:
            kwargs["clean_session"] = clean
        # No automatic reconnect: a dropped connection must stay dropped.
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=protocol, reconnect_on_failure=False, **kwargs)
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.connack = None
        self.granted = None
        self.messages = []
        self.acked = {}
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        if inflight is not None:
            self.client.max_inflight_messages_set(inflight)
        if will is not None:
            topic, payload, qos, retain = will
            self.client.will_set(topic, payload, qos=qos, retain=retain)
        if protocol == V5:
            props = None
            if expiry is not None:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = expiry
            self.client.connect(host, port, keepalive=keepalive, clean_start=clean,
                                properties=props)
        else:
            self.client.connect(host, port, keepalive=keepalive)
        self.client.loop_start()
        expect(self.connected.wait(WAIT), f"{client_id}: no CONNACK")
        rc = code(self.connack[1])
        expect(rc == 0, f"{client_id}: CONNACK reason code {rc}")

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack = (flags.session_present, reason_code, properties)
        self.connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self.granted = [code(r) for r in reason_codes]
        self.subscribed.set()

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append((msg.topic, msg.payload.decode(), msg.qos, bool(msg.retain)))

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self.lock:
            self.acked[mid] = code(reason_code)

    @property
    def session_present(self):
        return bool(self.connack[0])

    def subscribe(self, filters):
        """Subscribes to [(filter, qos)] in one SUBSCRIBE; returns the
        granted QoS (or reason codes) from the SUBACK."""
        self.subscribed.clear()
        result, _ = self.client.subscribe(filters)
        expect(result == mqtt.MQTT_ERR_SUCCESS, f"{self.client_id}: subscribe failed: {result}")
        expect(self.subscribed.wait(WAIT), f"{self.client_id}: no SUBACK for {filters}")
        return self.granted

    def subscribe_granted(self, filters):
        """Subscribes and expects every requested QoS to be granted as is."""
        granted = self.subscribe(filters)
        wanted = [q for _, q in filters]
        expect(granted == wanted, f"{self.client_id}: SUBACK {granted} for {filters}")

    def publish(self, topic, payload, qos, retain=False):
        """Publishes and, for QoS 1/2, waits for the PUBACK / PUBCOMP."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        expect(info.rc == mqtt.MQTT_ERR_SUCCESS, f"{self.client_id}: publish rc {info.rc}")
        self.wait_acked([info], f"{topic} {payload!r} at QoS {qos}")
        return info

    def wait_acked(self, infos, what):
        deadline = time.time() + WAIT
        for info in infos:
            info.wait_for_publish(max(0.0, deadline - time.time()))
            expect(info.is_published(), f"{self.client_id}: {what}: not completed in time")
        with self.lock:
            codes = {info.mid: self.acked.get(info.mid) for info in infos}
        bad = {mid: rc for mid, rc in codes.items() if rc is None or rc >= 0x80}
        expect(not bad, f"{self.client_id}: {what}: on_publish missing or failed: {bad}")

    def wait_messages(self, n, what="messages"):
        """Waits until at least n messages arrived; returns them all."""
        deadline = time.time() + WAIT
        while time.time() < deadline:
            with self.lock:
                if len(self.messages) >= n:
                    return list(self.messages)
            time.sleep(0.005)
        with self.lock:
            fail(f"{self.client_id}: expected {n} {what}, got {len(self.messages)}: "
                 f"{self.messages[:20]}")

    def settled(self, quiet=0.3):
        """Everything received, after `quiet` seconds without waiting for more."""
        time.sleep(quiet)
        with self.lock:
            return list(self.messages)

    def clear(self):
        with self.lock:
            self.messages.clear()

    def close(self):
        """Clean DISCONNECT."""
        info = self.client.disconnect()
        self.client.loop_stop()
        return info

    def drop(self):
        """Closes the TCP connection without DISCONNECT (abnormal close)."""
        sock = self.client.socket()
        expect(sock is not None, f"{self.client_id}: no socket to drop")
        sock.shutdown(socket.SHUT_RDWR)
        self.client.loop_stop()


def tag(protocol):
    return "311" if protocol == V311 else "5"


# 1. Persistent sessions.
def persistent(host, port, protocol):
    t = tag(protocol)
    cid = f"core-persist-{t}"
    expiry = 300 if protocol == V5 else None

    sub = Probe(host, port, cid, protocol, clean=False, expiry=expiry)
    expect(not sub.session_present,
           f"first connect of {cid} (fresh broker): session present set")
    sub.subscribe_granted([("core/persist/#", 1)])
    sub.close()

    pub = Probe(host, port, f"core-persist-pub-{t}", protocol)
    infos = [pub.client.publish("core/persist/x", f"m{i}", qos=1) for i in range(5)]
    pub.wait_acked(infos, "m0..m4 while the subscriber is offline")

    sub = Probe(host, port, cid, protocol, clean=False, expiry=expiry)
    expect(sub.session_present, f"resume of {cid}: CONNACK session present not set")
    want = [("core/persist/x", f"m{i}", 1, False) for i in range(5)]
    sub.wait_messages(5, "queued messages")
    got = sub.settled()
    expect(got == want, f"resumed session received {got}, expected {want}")
    # The subscription itself survived, not only the queued messages.
    sub.clear()
    pub.publish("core/persist/x", "live", 1)
    sub.wait_messages(1, "live message after resume")
    got = sub.settled(0.1)
    expect(got == [("core/persist/x", "live", 1, False)], f"after resume received {got}")
    sub.close()

    # Clean start discards the session and its subscription.
    sub = Probe(host, port, cid, protocol, clean=True)
    expect(not sub.session_present, f"clean connect of {cid}: session present set")
    sub.subscribe_granted([("core/persist-marker", 1)])
    pub.publish("core/persist/x", "after-clean", 1)
    pub.publish("core/persist-marker", "marker", 1)
    sub.wait_messages(1, "marker")
    got = sub.settled()
    expect(got == [("core/persist-marker", "marker", 1, False)],
           f"after clean start received {got} (the old subscription should be gone)")
    sub.close()

    if protocol == V5:
        # Without Session Expiry Interval (0) the session ends with the
        # connection, even with clean_start=False.
        cid0 = "core-persist-noexpiry-5"
        sub = Probe(host, port, cid0, protocol, clean=False)
        sub.subscribe_granted([("core/persist/#", 1)])
        sub.close()
        pub.publish("core/persist/x", "expired", 1)
        sub = Probe(host, port, cid0, protocol, clean=False)
        expect(not sub.session_present,
               f"resume of {cid0} (session expiry 0): CONNACK session present set")
        got = sub.settled()
        expect(got == [], f"resume of {cid0} (session expiry 0) received {got}")
        sub.close()
    pub.close()


# 2. QoS 2 both ways, and delivered QoS = min(published, granted).
def qos2(host, port, protocol):
    t = tag(protocol)
    sub = Probe(host, port, f"core-q2-sub-{t}", protocol)
    sub.subscribe_granted([("core/q2/two", 2), ("core/q2/one", 1)])
    pub = Probe(host, port, f"core-q2-pub-{t}", protocol)

    want = []
    for topic, payload, qos, delivered in [
        ("core/q2/two", "exactly-once", 2, 2),
        ("core/q2/one", "q2-to-q1", 2, 1),
        ("core/q2/two", "q1-to-q2", 1, 1),
        ("core/q2/two", "q0-to-q2", 0, 0),
    ]:
        if qos == 0:
            pub.client.publish(topic, payload, qos=0)
        else:
            # Waits for on_publish: PUBCOMP for QoS 2, PUBACK for QoS 1.
            pub.publish(topic, payload, qos)
        want.append((topic, payload, delivered, False))
        got = sub.wait_messages(len(want), f"messages up to {payload!r}")
        expect(got == want, f"received {got}, expected {want}")
    got = sub.settled()
    expect(got == want, f"received {got} (duplicates?), expected {want}")
    sub.close()
    pub.close()


# 3. Retained messages.
def retained(host, port, protocol):
    t = tag(protocol)
    pub = Probe(host, port, f"core-ret-pub-{t}", protocol)

    early = Probe(host, port, f"core-ret-early-{t}", protocol)
    early.subscribe_granted([("core/ret/+", 1)])
    pub.publish("core/ret/lamp", "on", 1, retain=True)
    early.wait_messages(1, "live retained publish")

    late = Probe(host, port, f"core-ret-late-{t}", protocol)
    late.subscribe_granted([("core/ret/+", 1)])
    late.wait_messages(1, "retained message on subscribe")
    got = late.settled()
    expect(got == [("core/ret/lamp", "on", 1, True)], f"new subscriber received {got}")
    got = early.settled(0)
    expect(got == [("core/ret/lamp", "on", 1, False)],
           f"subscriber present at publish time received {got}")

    # An empty retained payload clears it, and is delivered as normal.
    early.clear()
    pub.publish("core/ret/lamp", "", 1, retain=True)
    early.wait_messages(1, "empty retained publish")
    got = early.settled(0)
    expect(got == [("core/ret/lamp", "", 1, False)], f"current subscriber received {got}")

    # $SYS: a retained message there goes to "$SYS/#", never to "#".
    pub.publish("$SYS/core/test", "sys", 1, retain=True)
    newer = Probe(host, port, f"core-ret-newer-{t}", protocol)
    newer.subscribe_granted([("core/ret/+", 1)])
    hash_sub = Probe(host, port, f"core-ret-hash-{t}", protocol)
    hash_sub.subscribe_granted([("#", 1)])
    sys_sub = Probe(host, port, f"core-ret-sys-{t}", protocol)
    sys_sub.subscribe_granted([("$SYS/#", 1)])
    sys_sub.wait_messages(1, "retained $SYS message")
    time.sleep(QUIET)
    got = newer.settled(0)
    expect(got == [], f"subscriber after the clear received {got}")
    got = hash_sub.settled(0)
    expect(got == [], f"'#' subscriber received {got}; the only retained message is "
                      "$SYS/core/test, which '#' must not match")
    got = sys_sub.settled(0)
    expect(got == [("$SYS/core/test", "sys", 1, True)], f"'$SYS/#' subscriber received {got}")

    pub.publish("$SYS/core/test", "", 1, retain=True)
    for p in (pub, early, late, newer, hash_sub, sys_sub):
        p.close()


# 4. Wills.
def will(host, port, protocol):
    t = tag(protocol)
    watcher = Probe(host, port, f"core-will-watch-{t}", protocol)
    watcher.subscribe_granted([("core/will/#", 1)])

    w = Probe(host, port, f"core-will-w-{t}", protocol, keepalive=5,
              will=("core/will/w", "gone", 1, True))
    w.drop()
    watcher.wait_messages(1, "will after abnormal close")
    got = watcher.settled(0.1)
    expect(got == [("core/will/w", "gone", 1, False)], f"watcher received {got}")

    late = Probe(host, port, f"core-will-late-{t}", protocol)
    late.subscribe_granted([("core/will/#", 1)])
    late.wait_messages(1, "retained will")
    got = late.settled(0.1)
    expect(got == [("core/will/w", "gone", 1, True)], f"late subscriber received {got}")

    # A clean DISCONNECT discards the will.
    watcher.clear()
    w2 = Probe(host, port, f"core-will-w2-{t}", protocol, keepalive=5,
               will=("core/will/w2", "gone2", 1, False))
    w2.close()
    time.sleep(1.0)
    got = watcher.settled(0)
    expect(got == [], f"will published after a clean DISCONNECT: {got}")

    # Clear the retained will for the next run.
    late.publish("core/will/w", "", 1, retain=True)
    watcher.close()
    late.close()


# 5. Ordering of a burst of QoS 1 messages.
def order(host, port, protocol):
    t = tag(protocol)
    n = 500
    sub = Probe(host, port, f"core-order-sub-{t}", protocol)
    sub.subscribe_granted([("core/order", 1)])
    pub = Probe(host, port, f"core-order-pub-{t}", protocol, inflight=100)
    infos = [pub.client.publish("core/order", str(i), qos=1) for i in range(n)]
    sub.wait_messages(n, "ordered messages")
    pub.wait_acked(infos, f"{n} QoS 1 publishes")
    got = sub.settled()
    payloads = [m[1] for m in got]
    want = [str(i) for i in range(n)]
    if payloads != want:
        first = next((i for i, (a, b) in enumerate(zip(payloads, want)) if a != b),
                     min(len(payloads), len(want)))
        fail(f"received {len(payloads)} messages; first difference at index {first}: "
             f"{payloads[max(0, first - 3):first + 5]}")
    bad = [m for m in got if m[0] != "core/order" or m[2] != 1 or m[3]]
    expect(not bad, f"unexpected topic/qos/retain: {bad[:5]}")
    sub.close()
    pub.close()


# 6. Overlapping subscriptions: one delivery, at the highest granted QoS.
def overlap(host, port, protocol):
    t = tag(protocol)
    filters = [("core/ov/#", 0), ("core/ov/+", 2), ("core/ov/a", 1)]
    separate = Probe(host, port, f"core-ov-sep-{t}", protocol)
    for f in filters:
        separate.subscribe_granted([f])
    together = Probe(host, port, f"core-ov-list-{t}", protocol)
    together.subscribe_granted(filters)
    pub = Probe(host, port, f"core-ov-pub-{t}", protocol)

    want = []
    for payload, qos in [("two", 2), ("one", 1)]:
        pub.publish("core/ov/a", payload, qos)
        want.append(("core/ov/a", payload, qos, False))
        for sub in (separate, together):
            sub.wait_messages(len(want), f"messages up to {payload!r}")
    for name, sub in [("three SUBSCRIBEs", separate), ("one SUBSCRIBE", together)]:
        got = sub.settled()
        expect(got == want, f"{name}: received {got}, expected {want}")
    for p in (separate, together, pub):
        p.close()


SCENARIOS = {
    "persistent": persistent,
    "qos2": qos2,
    "retained": retained,
    "will": will,
    "order": order,
    "overlap": overlap,
}


def main():
    if len(sys.argv) != 4 or sys.argv[3] not in SCENARIOS:
        fail(f"usage: paho_core.py HOST PORT {{{','.join(SCENARIOS)}}}")
    host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    for protocol in (V311, V5):
        try:
            SCENARIOS[name](host, port, protocol)
        except SystemExit:
            print(f"(in scenario {name}, MQTT {'3.1.1' if protocol == V311 else '5.0'})",
                  file=sys.stderr)
            raise
    print("ok")


if __name__ == "__main__":
    main()

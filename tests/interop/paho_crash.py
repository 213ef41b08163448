"""The crash test's independent client: Eclipse Paho (paho-mqtt 2.x) decides
what counts as acknowledged, not our codec.

Usage: python3 paho_crash.py HOST PORT PHASE [ARGS]

PHASE is one of:
  prepare           a persistent subscriber (clean session 0, QoS 1 on
                    pcrash/#) subscribes and goes offline; a retained QoS 1
                    message is set on pcrash/state.
  publish FIRST FILE
                    publishes QoS 1 messages numbered from FIRST, as fast as
                    paho's in-flight window allows, until the connection
                    dies (the test SIGKILLs the broker); appends the number
                    of every message paho saw PUBACKed to FILE, one per line,
                    flushed as it arrives.
  verify FILE       the persistent subscriber comes back and must receive
                    every number in FILE; the retained message must still
                    be there.
Exits 0 when every expectation holds, 1 (with the reason on stderr)
otherwise.
"""

import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

WAIT = 10.0
SUBSCRIBER = "paho-crash-sub"


def fail(message):
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def client(client_id, clean):
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv311, clean_session=clean)
    c.max_inflight_messages_set(50)
    return c


def connect(c, host, port):
    connected = threading.Event()
    result = {}

    def on_connect(_c, _u, flags, reason, _p):
        result["present"] = flags.session_present
        result["reason"] = reason
        connected.set()

    c.on_connect = on_connect
    c.connect(host, port, keepalive=30)
    c.loop_start()
    if not connected.wait(WAIT):
        fail("no CONNACK")
    if result["reason"].is_failure:
        fail(f"CONNECT refused: {result['reason']}")
    return result["present"]


def prepare(host, port):
    sub = client(SUBSCRIBER, clean=False)
    connect(sub, host, port)
    subscribed = threading.Event()
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.subscribe("pcrash/#", qos=1)
    if not subscribed.wait(WAIT):
        fail("no SUBACK")
    sub.disconnect()
    sub.loop_stop()
    pub = client("paho-crash-retain", clean=True)
    connect(pub, host, port)
    info = pub.publish("pcrash/state", b"armed", qos=1, retain=True)
    info.wait_for_publish(WAIT)
    if not info.is_published():
        fail("the retained message was not acknowledged")
    pub.disconnect()
    pub.loop_stop()


def publish(host, port, first, path):
    out = open(path, "a", encoding="ascii")
    numbers = {}
    lock = threading.Lock()
    dead = threading.Event()

    # The PUBACK can beat publish() returning the mid: remember such mids.
    # (No lock of ours is held across publish(): paho calls on_publish
    # holding its own lock, and the two orders would deadlock.)
    early = set()

    def acknowledged(n):  # called holding `lock`
        out.write(f"{n}\n")
        out.flush()

    def on_publish(_c, _u, mid, _reason, _p):
        with lock:
            n = numbers.pop(mid, None)
            if n is None:
                early.add(mid)
            else:
                acknowledged(n)

    pub = client("paho-crash-pub", clean=True)
    pub.on_publish = on_publish
    pub.on_disconnect = lambda *_: dead.set()
    connect(pub, host, port)
    n = first
    deadline = time.monotonic() + 60
    while not dead.is_set() and time.monotonic() < deadline:
        # Keep paho's queue short: publish only while the window has room.
        with lock:
            waiting = len(numbers)
        if waiting >= 50:
            time.sleep(0.001)
            continue
        info = pub.publish("pcrash/data", str(n).encode(), qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            break
        with lock:
            if info.mid in early:
                early.discard(info.mid)
                acknowledged(n)
            else:
                numbers[info.mid] = n
        n += 1
    pub.loop_stop()
    out.close()
    if not dead.is_set():
        fail("the broker was never killed")


def verify(host, port, path):
    with open(path, encoding="ascii") as f:
        acked = {int(line) for line in f if line.strip()}
    if len(acked) < 100:
        fail(f"too little was published to test anything: {len(acked)} acknowledged")
    missing = set(acked)
    lock = threading.Lock()
    done = threading.Event()

    def on_message(_c, _u, message):
        if message.topic == "pcrash/data":
            with lock:
                missing.discard(int(message.payload))
                if not missing:
                    done.set()

    sub = client(SUBSCRIBER, clean=False)
    sub.on_message = on_message
    present = connect(sub, host, port)
    if not present:
        fail("the persistent session was lost")
    # Progress, not a fixed time: wait while messages keep arriving.
    last = len(missing)
    while not done.wait(WAIT):
        with lock:
            now = len(missing)
        if now == last:
            sample = sorted(missing)[:5]
            fail(f"{now} of {len(acked)} acknowledged messages never arrived, e.g. {sample}")
        last = now
    sub.disconnect()
    sub.loop_stop()

    retained = threading.Event()
    late = client("paho-crash-late", clean=True)

    def on_retained(_c, _u, message):
        if message.topic == "pcrash/state" and message.payload == b"armed" and message.retain:
            retained.set()

    late.on_message = on_retained
    connect(late, host, port)
    late.subscribe("pcrash/state", qos=1)
    if not retained.wait(WAIT):
        fail("the retained message set before the first kill is gone")
    late.disconnect()
    late.loop_stop()
    print(f"{len(acked)} acknowledged messages all delivered")


def main():
    host, port, phase = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if phase == "prepare":
        prepare(host, port)
    elif phase == "publish":
        publish(host, port, int(sys.argv[4]), sys.argv[5])
    elif phase == "verify":
        verify(host, port, sys.argv[4])
    else:
        fail(f"unknown phase {phase}")


if __name__ == "__main__":
    main()

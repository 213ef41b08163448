"""Checks ferrymq's MQTT 5.0 features with an independent client: Eclipse
Paho (paho-mqtt 2.x), plus a hand-built CONNECT on a plain socket where
paho cannot be made to misbehave (keepalive).

Usage: python3 paho_v5.py HOST PORT SCENARIO
SCENARIO is one of: session_expiry, message_expiry, will_delay,
flow_control, max_packet_size, topic_alias, sub_ids, no_local_rap_rh,
shared, properties, auth_unknown, reason_codes.
session_expiry expects the broker to run with
`[storage] max_session_expiry_secs = 60`; the others expect the defaults.
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
from paho.mqtt.subscribeoptions import SubscribeOptions

# How long to wait for something that must happen.
WAIT = 5.0
# How long to wait to be sure something does not happen.
QUIET = 0.5


def fail(message):
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def expect(condition, message):
    if not condition:
        fail(message)


def code(value):
    """A reason code (paho ReasonCode or int) as an int."""
    return int(value.value if hasattr(value, "value") else value)


def props(packet_type, **values):
    """A paho Properties of `packet_type` with the given values set."""
    p = Properties(packet_type)
    for name, value in values.items():
        setattr(p, name, value)
    return p


def prop(properties, name):
    """A property's value, or None when absent (or no properties at all)."""
    if properties is None:
        return None
    return getattr(properties, name, None)


def present(properties):
    """{name: value} of every property that is set."""
    return {} if properties is None else properties.json()


class Msg:
    """One received PUBLISH. `topic` is the topic after resolving the
    server's topic alias; `wire_topic` is the topic name as sent (empty
    when only an alias was sent)."""

    def __init__(self, topic, wire_topic, payload, qos, retain, properties, mid):
        self.topic = topic
        self.wire_topic = wire_topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.properties = properties
        self.mid = mid

    def brief(self):
        return (self.topic, self.payload, self.qos, self.retain)

    def __repr__(self):
        return f"Msg{self.brief()} wire_topic={self.wire_topic!r} props={present(self.properties)}"


class Probe:
    """An MQTT 5.0 paho client on its own network thread that records what
    it gets."""

    def __init__(self, host, port, client_id, clean=True, connect_props=None, will=None,
                 keepalive=30, manual_ack=False, expect_rc=0):
        """connect_props: {property name: value} for CONNECT.
        will: (topic, payload, qos, retain, {will property: value}).
        expect_rc: the CONNACK reason code that must come back."""
        self.client_id = client_id
        # No automatic reconnect: a dropped connection must stay dropped.
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5, reconnect_on_failure=False,
                                  manual_ack=manual_ack)
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.disconnected = threading.Event()
        self.connack = None
        self.granted = None
        self.messages = []
        # With manual_ack: how many of `messages` were acknowledged, and the
        # most that were ever unacknowledged at once.
        self.n_acked = 0
        self.max_unacked = 0
        self.acked = {}
        self.disconnects = []
        self.errors = []
        # The Topic Alias Maximum we announce; the server's aliases must fit.
        self.alias_max = (connect_props or {}).get("TopicAliasMaximum", 0)
        self.aliases = {}
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = self._on_disconnect
        if will is not None:
            topic, payload, qos, retain, will_values = will
            self.client.will_set(topic, payload, qos=qos, retain=retain,
                                 properties=props(PacketTypes.WILLMESSAGE, **will_values))
        cprops = props(PacketTypes.CONNECT, **connect_props) if connect_props else None
        self.client.connect(host, port, keepalive=keepalive, clean_start=clean,
                            properties=cprops)
        self.client.loop_start()
        expect(self.connected.wait(WAIT), f"{client_id}: no CONNACK")
        rc = code(self.connack[1])
        expect(rc == expect_rc,
               f"{client_id}: CONNACK reason code {rc:#04x}, expected {expect_rc:#04x} "
               f"(properties {present(self.connack[2])})")

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack = (flags.session_present, reason_code, properties)
        self.connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self.granted = [code(r) for r in reason_codes]
        self.subscribed.set()

    def _on_message(self, client, userdata, msg):
        wire_topic = msg.topic
        alias = prop(msg.properties, "TopicAlias")
        topic = wire_topic
        with self.lock:
            if alias is not None:
                if not 1 <= alias <= self.alias_max:
                    self.errors.append(f"server used topic alias {alias} but our "
                                       f"Topic Alias Maximum is {self.alias_max}")
                if wire_topic:
                    self.aliases[alias] = wire_topic
                else:
                    topic = self.aliases.get(alias)
                    if topic is None:
                        self.errors.append(f"empty topic with unknown alias {alias}")
            elif not wire_topic:
                self.errors.append("PUBLISH with an empty topic and no alias")
            self.messages.append(Msg(topic, wire_topic, msg.payload, msg.qos,
                                     bool(msg.retain), msg.properties, msg.mid))
            self.max_unacked = max(self.max_unacked, len(self.messages) - self.n_acked)

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self.lock:
            self.acked[mid] = code(reason_code)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        with self.lock:
            self.disconnects.append((flags.is_disconnect_packet_from_server,
                                     code(reason_code), present(properties)))
        self.disconnected.set()

    @property
    def session_present(self):
        return bool(self.connack[0])

    @property
    def connack_props(self):
        return self.connack[2]

    def subscribe(self, topic, qos_or_options=1, sub_props=None):
        """Subscribes to one filter; returns the SUBACK reason codes."""
        self.subscribed.clear()
        if isinstance(qos_or_options, SubscribeOptions):
            result, _ = self.client.subscribe(topic, options=qos_or_options,
                                              properties=sub_props)
        else:
            result, _ = self.client.subscribe(topic, qos=qos_or_options, properties=sub_props)
        expect(result == mqtt.MQTT_ERR_SUCCESS, f"{self.client_id}: subscribe failed: {result}")
        expect(self.subscribed.wait(WAIT), f"{self.client_id}: no SUBACK for {topic}")
        return self.granted

    def subscribe_granted(self, topic, qos_or_options=1, sub_props=None):
        granted = self.subscribe(topic, qos_or_options, sub_props)
        qos = (qos_or_options.QoS if isinstance(qos_or_options, SubscribeOptions)
               else qos_or_options)
        expect(granted == [qos], f"{self.client_id}: SUBACK {granted} for {topic}")

    def send(self, topic, payload, qos=1, retain=False, **publish_props):
        """Publishes without waiting; returns paho's MQTTMessageInfo."""
        pprops = props(PacketTypes.PUBLISH, **publish_props) if publish_props else None
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=pprops)
        expect(info.rc == mqtt.MQTT_ERR_SUCCESS, f"{self.client_id}: publish rc {info.rc}")
        return info

    def publish(self, topic, payload, qos=1, retain=False, expect_rc=None, **publish_props):
        """Publishes and waits for the PUBACK / PUBCOMP; returns its reason
        code. Without expect_rc, any success code (< 0x80) is accepted."""
        info = self.send(topic, payload, qos, retain, **publish_props)
        if qos == 0:
            return None
        info.wait_for_publish(WAIT)
        with self.lock:
            rc = self.acked.get(info.mid)
        expect(rc is not None, f"{self.client_id}: {topic} {payload!r}: no acknowledgement")
        if expect_rc is None:
            expect(rc < 0x80, f"{self.client_id}: {topic} {payload!r}: reason code {rc:#04x}")
        else:
            expect(rc == expect_rc, f"{self.client_id}: {topic} {payload!r}: reason code "
                                    f"{rc:#04x}, expected {expect_rc:#04x}")
        return rc

    def wait_messages(self, n, what="messages", timeout=WAIT):
        """Waits until at least n messages arrived; returns them all."""
        deadline = time.time() + timeout
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
        self.check_aliases()
        with self.lock:
            return list(self.messages)

    def check_aliases(self):
        with self.lock:
            errors = list(self.errors)
        expect(not errors, f"{self.client_id}: {errors}")

    def ack_received(self):
        """With manual_ack: sends the PUBACK of every message received and
        not acknowledged yet."""
        with self.lock:
            todo = self.messages[self.n_acked:]
            self.n_acked = len(self.messages)
        for m in todo:
            self.client.ack(m.mid, m.qos)

    def clear(self):
        with self.lock:
            self.messages.clear()

    def close(self, disconnect_props=None):
        """Clean DISCONNECT (normal disconnection), optionally with
        {DISCONNECT property: value}."""
        dprops = props(PacketTypes.DISCONNECT, **disconnect_props) if disconnect_props else None
        self.client.disconnect(properties=dprops)
        self.client.loop_stop()

    def drop(self):
        """Closes the TCP connection without DISCONNECT (abnormal close)."""
        sock = self.client.socket()
        expect(sock is not None, f"{self.client_id}: no socket to drop")
        sock.shutdown(socket.SHUT_RDWR)
        self.client.loop_stop()


def briefs(messages):
    return [m.brief() for m in messages]


# 1. Session Expiry Interval: the session outlives the connection for the
# interval and no longer; a DISCONNECT may shorten it to 0; the broker caps
# it (the broker runs with max_session_expiry_secs = 60).
def session_expiry(host, port):
    cid = "v5-exp"
    sub = Probe(host, port, cid, clean=False, connect_props={"SessionExpiryInterval": 2})
    expect(not sub.session_present, f"first connect of {cid}: session present set")
    sub.subscribe_granted("v5/exp", 1)
    sub.close()
    closed = time.time()

    pub = Probe(host, port, "v5-exp-pub")
    pub.publish("v5/exp", b"queued", 1)
    sub = Probe(host, port, cid, clean=False, connect_props={"SessionExpiryInterval": 2})
    resumed = time.time() - closed
    expect(resumed < 1.5, f"setup too slow: reconnect took {resumed:.2f}s of the 2 s expiry")
    expect(sub.session_present,
           f"resume of {cid} {resumed:.2f}s after DISCONNECT (expiry 2 s): "
           "CONNACK session present not set")
    sub.wait_messages(1, "queued message")
    got = briefs(sub.settled())
    expect(got == [("v5/exp", b"queued", 1, False)], f"resumed session received {got}")
    sub.close()
    closed = time.time()

    time.sleep(max(0.0, closed + 3.5 - time.time()))
    sub = Probe(host, port, cid, clean=False, connect_props={"SessionExpiryInterval": 2})
    expect(not sub.session_present,
           f"resume of {cid} 3.5 s after DISCONNECT (expiry 2 s): session present set")
    pub.publish("v5/exp", b"after-expiry", 1)
    got = briefs(sub.settled())
    expect(got == [], f"expired session still delivered {got}")
    sub.close(disconnect_props={"SessionExpiryInterval": 0})

    # DISCONNECT with Session Expiry Interval 0 ends the session at once.
    cid0 = "v5-exp-zero"
    sub = Probe(host, port, cid0, clean=False, connect_props={"SessionExpiryInterval": 300})
    sub.subscribe_granted("v5/exp", 1)
    sub.close(disconnect_props={"SessionExpiryInterval": 0})
    sub = Probe(host, port, cid0, clean=False, connect_props={"SessionExpiryInterval": 300})
    expect(not sub.session_present,
           f"resume of {cid0} after DISCONNECT with Session Expiry Interval 0: "
           "session present set")
    sub.close(disconnect_props={"SessionExpiryInterval": 0})

    # The broker caps the interval and says so in CONNACK.
    cap = Probe(host, port, "v5-exp-cap", connect_props={"SessionExpiryInterval": 3600})
    got = prop(cap.connack_props, "SessionExpiryInterval")
    expect(got == 60, f"CONNACK Session Expiry Interval {got} for a request of 3600 with "
                      f"max_session_expiry_secs = 60 (CONNACK properties "
                      f"{present(cap.connack_props)})")
    cap.close(disconnect_props={"SessionExpiryInterval": 0})
    pub.close()


# 2. Message Expiry Interval: expired messages are not delivered from a
# queue nor from the retained store; the remaining lifetime is forwarded.
def message_expiry(host, port):
    cid = "v5-mexp-sub"
    sub = Probe(host, port, cid, clean=False, connect_props={"SessionExpiryInterval": 300})
    sub.subscribe_granted("v5/mexp/+", 1)
    sub.close()

    pub = Probe(host, port, "v5-mexp-pub")
    pub.publish("v5/mexp/a", b"short", 1, MessageExpiryInterval=1)
    pub.publish("v5/mexp/b", b"long", 1, MessageExpiryInterval=60)
    pub.publish("v5/mret/short", b"r-short", 1, retain=True, MessageExpiryInterval=1)
    pub.publish("v5/mret/long", b"r-long", 1, retain=True, MessageExpiryInterval=60)
    time.sleep(2.5)

    sub = Probe(host, port, cid, clean=False, connect_props={"SessionExpiryInterval": 300})
    expect(sub.session_present, f"resume of {cid}: session present not set")
    sub.wait_messages(1, "unexpired queued message")
    got = sub.settled(QUIET)
    expect(briefs(got) == [("v5/mexp/b", b"long", 1, False)],
           f"after 2.5 s offline received {got}; expected only the 60 s message")
    left = prop(got[0].properties, "MessageExpiryInterval")
    expect(left is not None and 57 <= left <= 60,
           f"queued message forwarded with Message Expiry Interval {left}; "
           "expected 57..=60 (60 minus the ~2.5 s spent queued)")
    sub.close(disconnect_props={"SessionExpiryInterval": 0})

    late = Probe(host, port, "v5-mret-late")
    late.subscribe_granted("v5/mret/+", 1)
    late.wait_messages(1, "unexpired retained message")
    got = late.settled(QUIET)
    expect(briefs(got) == [("v5/mret/long", b"r-long", 1, True)],
           f"new subscriber received retained {got}; expected only the 60 s one")
    left = prop(got[0].properties, "MessageExpiryInterval")
    expect(left is not None and 57 <= left <= 60,
           f"retained message sent with Message Expiry Interval {left}; expected 57..=60")
    pub.publish("v5/mret/long", b"", 1, retain=True)
    late.close()
    pub.close()


# 3. Will Delay Interval: the will waits for the delay, and is cancelled
# when the session is resumed in time.
def will_delay(host, port):
    watcher = Probe(host, port, "v5-wd-watch")
    watcher.subscribe_granted("v5/wd/#", 1)

    def willing(cid, topic):
        return Probe(host, port, cid, connect_props={"SessionExpiryInterval": 30},
                     will=(topic, b"gone", 1, False, {"WillDelayInterval": 2}))

    w = willing("v5-wd-w", "v5/wd/w")
    w2 = willing("v5-wd-w2", "v5/wd/w2")
    w.drop()
    w2.drop()
    dropped = time.time()

    time.sleep(max(0.0, dropped + 0.5 - time.time()))
    back = Probe(host, port, "v5-wd-w2", clean=False,
                 connect_props={"SessionExpiryInterval": 30})
    expect(back.session_present, "v5-wd-w2 resumed 0.5 s after the drop: session present "
                                 "not set")

    time.sleep(max(0.0, dropped + 1.0 - time.time()))
    got = watcher.settled(0)
    expect(got == [], f"will delivered within 1 s of the drop (delay 2 s): {got}")
    watcher.wait_messages(1, "delayed will", timeout=max(0.0, dropped + 3.5 - time.time()))
    arrived = time.time() - dropped
    expect(arrived >= 1.8, f"will delivered {arrived:.2f}s after the drop; delay is 2 s")
    time.sleep(max(0.0, dropped + 3.5 - time.time()))
    got = briefs(watcher.settled(0))
    expect(got == [("v5/wd/w", b"gone", 1, False)],
           f"watcher received {got}; expected only v5-wd-w's will (v5-wd-w2 resumed its "
           "session before the delay, which cancels the will)")
    back.close(disconnect_props={"SessionExpiryInterval": 0})
    watcher.close()


# 4. CONNACK capabilities and Receive Maximum towards the client.
def flow_control(host, port):
    c = Probe(host, port, "v5-fc-caps")
    got = present(c.connack_props)
    want = {
        "ReceiveMaximum": 1024,
        "MaximumPacketSize": 1048576,
        "TopicAliasMaximum": 64,
        "RetainAvailable": 1,
        "WildcardSubscriptionAvailable": 1,
        "SubscriptionIdentifierAvailable": 1,
        "SharedSubscriptionAvailable": 1,
    }
    wrong = {k: got.get(k) for k, v in want.items() if got.get(k) != v}
    expect(not wrong, f"CONNACK properties {got}: wrong or missing {wrong}, expected {want}")
    expect("MaximumQoS" not in got, f"CONNACK has Maximum QoS (QoS 2 is supported): {got}")
    c.close()

    sub = Probe(host, port, "v5-fc-sub", connect_props={"ReceiveMaximum": 2}, manual_ack=True)
    sub.subscribe_granted("v5/fc", 1)
    pub = Probe(host, port, "v5-fc-pub")
    for i in range(5):
        pub.publish("v5/fc", f"m{i}".encode(), 1)
    sub.wait_messages(2, "messages up to Receive Maximum")
    got = sub.settled(QUIET)
    expect(briefs(got) == [("v5/fc", b"m0", 1, False), ("v5/fc", b"m1", 1, False)],
           f"with Receive Maximum 2 and no PUBACK sent, received {got}")
    # Acknowledge as messages come; never more than 2 are unacknowledged.
    deadline = time.time() + WAIT
    while time.time() < deadline:
        sub.ack_received()
        with sub.lock:
            if len(sub.messages) >= 5:
                break
        time.sleep(0.01)
    sub.ack_received()
    got = sub.settled(QUIET)
    want = [("v5/fc", f"m{i}".encode(), 1, False) for i in range(5)]
    expect(briefs(got) == want, f"after acknowledging, received {got}, expected {want}")
    expect(sub.max_unacked == 2, f"{sub.max_unacked} unacknowledged messages in flight at "
                                 "once with Receive Maximum 2")
    sub.close()
    pub.close()


# 5. Maximum Packet Size of the client: larger messages are not sent to it.
def max_packet_size(host, port):
    sub = Probe(host, port, "v5-mps-sub", connect_props={"MaximumPacketSize": 200})
    sub.subscribe_granted("v5/mps", 1)
    pub = Probe(host, port, "v5-mps-pub")
    pub.publish("v5/mps", b"x" * 1000, 1)
    pub.publish("v5/mps", b"y" * 10, 1)
    sub.wait_messages(1, "small message")
    got = sub.settled(QUIET)
    expect(briefs(got) == [("v5/mps", b"y" * 10, 1, False)],
           f"subscriber with Maximum Packet Size 200 received "
           f"{[(m.topic, len(m.payload)) for m in got]}; expected only the 10-byte payload")
    expect(not sub.disconnects, f"subscriber disconnected: {sub.disconnects}")
    sub.close()
    pub.close()


# 6. Topic aliases, from a publisher and towards a subscriber. (paho 2.1
# does not resolve the aliases it receives: msg.topic is then empty, so
# Probe resolves them and checks they fit our Topic Alias Maximum.)
def topic_alias(host, port):
    plain = Probe(host, port, "v5-ta-plain")
    plain.subscribe_granted("v5/ta/#", 1)
    pub = Probe(host, port, "v5-ta-pub")
    pub.publish("v5/ta/x", b"1", 1, TopicAlias=1)
    pub.publish("", b"2", 1, TopicAlias=1)
    plain.wait_messages(2, "messages published with a topic alias")
    got = plain.settled()
    expect(briefs(got) == [("v5/ta/x", b"1", 1, False), ("v5/ta/x", b"2", 1, False)],
           f"subscriber received {got}")
    # It announced no Topic Alias Maximum, so it must get full topic names.
    bad = [m for m in got if m.wire_topic != "v5/ta/x" or prop(m.properties, "TopicAlias")]
    expect(not bad, f"subscriber without Topic Alias Maximum got aliased messages: {bad}")

    aliased = Probe(host, port, "v5-ta-aliased", connect_props={"TopicAliasMaximum": 10})
    aliased.subscribe_granted("v5/ta/#", 1)
    for i in range(3):
        pub.publish("v5/ta/y", f"y{i}".encode(), 1)
    aliased.wait_messages(3, "messages to a client accepting aliases")
    got = aliased.settled()
    want = [("v5/ta/y", f"y{i}".encode(), 1, False) for i in range(3)]
    expect(briefs(got) == want, f"subscriber with Topic Alias Maximum 10 received {got} "
                                f"(topics after resolving aliases), expected {want}")
    for p in (plain, aliased, pub):
        p.close()


# 7. Subscription identifiers: one delivery carrying every matching id.
def sub_ids(host, port):
    sub = Probe(host, port, "v5-sid-sub")
    sub.subscribe_granted("v5/sid/#", 1, props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=7))
    sub.subscribe_granted("v5/sid/+", 1, props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=9))
    pub = Probe(host, port, "v5-sid-pub")
    pub.publish("v5/sid/x", b"both", 1)
    pub.publish("v5/sid/x/y", b"hash-only", 1)
    sub.wait_messages(2, "messages")
    got = sub.settled()
    expect(briefs(got) == [("v5/sid/x", b"both", 1, False),
                           ("v5/sid/x/y", b"hash-only", 1, False)],
           f"received {got}; expected one delivery per message")
    ids = sorted(prop(got[0].properties, "SubscriptionIdentifier") or [])
    expect(ids == [7, 9], f"v5/sid/x arrived with Subscription Identifiers {ids}, "
                          "expected [7, 9]")
    ids = prop(got[1].properties, "SubscriptionIdentifier")
    expect(ids == [7], f"v5/sid/x/y arrived with Subscription Identifiers {ids}, expected [7]")
    sub.close()
    pub.close()


# 8. Subscription options: No Local, Retain As Published, Retain Handling.
def no_local_rap_rh(host, port):
    me = Probe(host, port, "v5-nl-me")
    me.subscribe_granted("v5/nl", SubscribeOptions(qos=1, noLocal=True))
    other = Probe(host, port, "v5-nl-other")
    me.publish("v5/nl", b"own", 1)
    other.publish("v5/nl", b"other", 1)
    me.wait_messages(1, "the other client's message")
    got = briefs(me.settled())
    expect(got == [("v5/nl", b"other", 1, False)],
           f"No Local subscriber received {got}; expected only the other client's message")

    # Retain As Published: the retain flag of a live message is kept;
    # without it, it is cleared.
    rap = Probe(host, port, "v5-rap-sub")
    rap.subscribe_granted("v5/rap/kept", SubscribeOptions(qos=1, retainAsPublished=True))
    rap.subscribe_granted("v5/rap/cleared", SubscribeOptions(qos=1))
    other.publish("v5/rap/kept", b"k", 1, retain=True)
    other.publish("v5/rap/cleared", b"c", 1, retain=True)
    rap.wait_messages(2, "live retained publishes")
    got = briefs(rap.settled())
    expect(got == [("v5/rap/kept", b"k", 1, True), ("v5/rap/cleared", b"c", 1, False)],
           f"received {got}; Retain As Published keeps retain=1, otherwise it is 0")

    # Retain Handling: 2 never sends retained messages at subscribe time,
    # 1 only for a new subscription, 0 always.
    rh = Probe(host, port, "v5-rh-sub")
    rh.subscribe_granted("v5/rap/kept", SubscribeOptions(qos=1, retainHandling=2))
    got = briefs(rh.settled(QUIET))
    expect(got == [], f"Retain Handling 2: received {got} at subscribe time")
    rh.subscribe_granted("v5/rap/cleared", SubscribeOptions(qos=1, retainHandling=1))
    rh.wait_messages(1, "retained message for a new subscription (Retain Handling 1)")
    got = briefs(rh.settled())
    expect(got == [("v5/rap/cleared", b"c", 1, True)], f"Retain Handling 1 (new): {got}")
    rh.clear()
    rh.subscribe_granted("v5/rap/cleared", SubscribeOptions(qos=1, retainHandling=1))
    got = briefs(rh.settled(QUIET))
    expect(got == [], f"Retain Handling 1 on an existing subscription: received {got}")
    rh.subscribe_granted("v5/rap/cleared", SubscribeOptions(qos=1, retainHandling=0))
    rh.wait_messages(1, "retained message (Retain Handling 0)")
    got = briefs(rh.settled())
    expect(got == [("v5/rap/cleared", b"c", 1, True)], f"Retain Handling 0: {got}")
    # The Retain Handling 2 subscription is live.
    rh.clear()
    other.publish("v5/rap/kept", b"live", 1)
    rh.wait_messages(1, "live message on the Retain Handling 2 subscription")
    got = briefs(rh.settled())
    expect(got == [("v5/rap/kept", b"live", 1, False)], f"live message: {got}")

    other.publish("v5/rap/kept", b"", 1, retain=True)
    other.publish("v5/rap/cleared", b"", 1, retain=True)
    for p in (me, other, rap, rh):
        p.close()


# 9. Shared subscriptions. Which member gets a message is the broker's
# choice (MQTT 5.0 4.8.2); ferrymq serves members that have room in their
# Receive Maximum, so with Receive Maximum 1 and no PUBACK yet each member
# must hold exactly one message while the rest wait for them.
def shared(host, port):
    members = [Probe(host, port, f"v5-sh-{i}", connect_props={"ReceiveMaximum": 1},
                     manual_ack=True) for i in (1, 2)]
    for m in members:
        m.subscribe_granted("$share/g/v5/sh/#", 1)
    normal = Probe(host, port, "v5-sh-normal")
    normal.subscribe_granted("v5/sh/#", 1)
    pub = Probe(host, port, "v5-sh-pub")
    infos = [pub.send("v5/sh/t", str(i).encode(), 1) for i in range(20)]
    for info in infos:
        info.wait_for_publish(WAIT)
    normal.wait_messages(20, "messages for the normal subscription")
    want = [str(i).encode() for i in range(20)]
    got = [m.payload for m in normal.settled()]
    expect(got == want, f"normal subscriber received {got}")

    for m in members:
        m.wait_messages(1, "first message of the shared group (Receive Maximum 1)")
    time.sleep(QUIET)
    held = [[x.payload for x in m.settled(0)] for m in members]
    expect(all(len(h) == 1 for h in held),
           f"shared members with Receive Maximum 1 and no PUBACK hold {held}; "
           "expected one message each")

    deadline = time.time() + WAIT
    while time.time() < deadline:
        for m in members:
            m.ack_received()
        if sum(len(m.settled(0)) for m in members) >= 20:
            break
        time.sleep(0.01)
    for m in members:
        m.ack_received()
    time.sleep(0.3)
    one, two = ([x.payload for x in m.settled(0)] for m in members)
    expect(sorted(one + two, key=int) == want,
           f"shared group received {one} and {two}: expected each of the 20 exactly once")
    bad = [x for m in members for x in m.messages if x.topic != "v5/sh/t" or x.qos != 1]
    expect(not bad, f"shared deliveries with wrong topic or QoS: {bad}")
    unacked = [m.max_unacked for m in members]
    expect(unacked == [1, 1], f"most unacknowledged messages at once per member: {unacked}; "
                              "Receive Maximum is 1")

    # No Local on a shared subscription is a protocol error.
    nl = Probe(host, port, "v5-sh-nolocal")
    nl.client.subscribe("$share/g/v5/sh/#", options=SubscribeOptions(qos=1, noLocal=True))
    expect(nl.disconnected.wait(WAIT),
           "No Local on a shared subscription: still connected")
    with nl.lock:
        got = list(nl.disconnects)
    expect(got and got[0][0] and got[0][1] == 0x82,
           f"No Local on a shared subscription: disconnects {got} "
           "(from server, reason, properties); expected a DISCONNECT 0x82 from the server")
    nl.client.loop_stop()
    for p in members + [normal, pub]:
        p.close()


# 10. Publish properties pass through; payload format is checked;
# response information on request.
def properties(host, port):
    sub = Probe(host, port, "v5-props-sub")
    sub.subscribe_granted("v5/props/#", 1)
    pub = Probe(host, port, "v5-props-pub")
    sent = {
        "UserProperty": [("k", "1"), ("k", "2"), ("a", "b")],
        "ContentType": "text/plain; charset=utf-8",
        "ResponseTopic": "v5/props/reply",
        "CorrelationData": b"\x00\x01corr\xff",
        "PayloadFormatIndicator": 1,
    }
    pub.publish("v5/props/x", "h\u00e9llo".encode(), 1, **sent)
    sub.wait_messages(1, "message with properties")
    got = sub.settled()
    expect(briefs(got) == [("v5/props/x", "h\u00e9llo".encode(), 1, False)],
           f"received {got}")
    received = {k: getattr(got[0].properties, k) for k in present(got[0].properties)}
    expect(received == sent, f"properties received {received}, sent {sent}")

    sub.clear()
    pub.publish("v5/props/bad", b"\xff\xfe", 1, expect_rc=0x99, PayloadFormatIndicator=1)
    got = sub.settled(QUIET)
    expect(got == [], f"payload that is not UTF-8 (format indicator 1) was delivered: {got}")

    info = Probe(host, port, "v5-props-rri", connect_props={"RequestResponseInformation": 1})
    got = prop(info.connack_props, "ResponseInformation")
    expect(isinstance(got, str) and got != "",
           f"Request Response Information 1: CONNACK Response Information {got!r} "
           f"(CONNACK properties {present(info.connack_props)})")
    got = prop(sub.connack_props, "ResponseInformation")
    expect(got is None, f"Response Information {got!r} sent though not requested")
    for p in (sub, pub, info):
        p.close()


# 11. An authentication method the broker does not know.
def auth_unknown(host, port):
    c = Probe(host, port, "v5-auth", connect_props={"AuthenticationMethod": "SCRAM-SHA-256"},
              expect_rc=0x8C)
    c.client.loop_stop()


def split_packet(buf):
    """(first complete MQTT packet, rest) of buf, or (None, buf)."""
    length, mult = 0, 1
    for i in range(1, min(len(buf), 5)):
        length += (buf[i] & 0x7F) * mult
        mult *= 128
        if buf[i] & 0x80 == 0:
            end = i + 1 + length
            return (buf[:end], buf[end:]) if len(buf) >= end else (None, buf)
    return None, buf


def read_packet(sock, buf, deadline):
    """Reads one MQTT packet; returns (packet bytes, rest), or (None, buf)
    when the connection closes first."""
    while True:
        packet, rest = split_packet(buf)
        if packet is not None:
            return packet, rest
        left = deadline - time.time()
        expect(left > 0, f"no complete packet in time (have {buf.hex()})")
        sock.settimeout(left)
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            chunk = b""
        except socket.timeout:
            fail(f"no complete packet in time (have {buf.hex()})")
        if not chunk:
            return None, buf
        buf += chunk


# 12. Reason codes: no matching subscribers; keepalive timeout.
def reason_codes(host, port):
    pub = Probe(host, port, "v5-rc-pub")
    pub.publish("v5/rc/nobody", b"x", 1, expect_rc=0x10)
    sub = Probe(host, port, "v5-rc-sub")
    sub.subscribe_granted("v5/rc/somebody", 1)
    pub.publish("v5/rc/somebody", b"x", 1, expect_rc=0x00)
    sub.wait_messages(1, "message to a subscribed topic")
    pub.close()
    sub.close()

    # A client with keepalive 1 that then says nothing: hand-built CONNECT
    # (MQTT 5, clean start, keepalive 1, no properties, client id "v5-ka").
    cid = b"v5-ka"
    body = (b"\x00\x04MQTT\x05\x02\x00\x01\x00"
            + len(cid).to_bytes(2, "big") + cid)
    sock = socket.create_connection((host, port), timeout=WAIT)
    sock.sendall(bytes([0x10, len(body)]) + body)
    start = time.time()
    connack, buf = read_packet(sock, b"", start + WAIT)
    expect(connack is not None and connack[0] == 0x20 and connack[3] == 0x00,
           f"keepalive client: expected a successful CONNACK, got {connack!r}")
    packet, buf = read_packet(sock, buf, start + 4.0)
    gone = time.time() - start
    expect(packet is not None, f"keepalive 1, silent: connection closed after {gone:.2f}s "
                               "without a DISCONNECT")
    expect(packet[0] == 0xE0 and len(packet) >= 3 and packet[2] == 0x8D,
           f"keepalive 1, silent: got {packet.hex()} after {gone:.2f}s; expected a "
           "DISCONNECT (e0 ..) with reason 0x8d (Keep Alive timeout)")
    expect(1.0 <= gone <= 3.0,
           f"keepalive 1: DISCONNECT after {gone:.2f}s, expected about 1.5 s")
    rest, buf = read_packet(sock, buf, time.time() + WAIT)
    expect(rest is None, f"after the DISCONNECT the broker sent {rest.hex() if rest else ''}")
    sock.close()


SCENARIOS = {
    "session_expiry": session_expiry,
    "message_expiry": message_expiry,
    "will_delay": will_delay,
    "flow_control": flow_control,
    "max_packet_size": max_packet_size,
    "topic_alias": topic_alias,
    "sub_ids": sub_ids,
    "no_local_rap_rh": no_local_rap_rh,
    "shared": shared,
    "properties": properties,
    "auth_unknown": auth_unknown,
    "reason_codes": reason_codes,
}


def main():
    if len(sys.argv) != 4 or sys.argv[3] not in SCENARIOS:
        fail(f"usage: paho_v5.py HOST PORT {{{','.join(SCENARIOS)}}}")
    host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    try:
        SCENARIOS[name](host, port)
    except SystemExit:
        print(f"(in scenario {name})", file=sys.stderr)
        raise
    print("ok")


if __name__ == "__main__":
    main()

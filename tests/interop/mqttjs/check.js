// MQTT.js against the real broker, run by tests/websocket.rs.
//
//   node check.js exchange URL VERSION [CA_FILE]
//     Subscribes at QoS 1, publishes COUNT messages at QoS 1 (each
//     acknowledged), and expects them back in order at QoS 1; then
//     publishes "from-mqttjs" to ws/cross for a client on another listener.
//   node check.js refused URL VERSION [CA_FILE]
//     Connects as USER / PASSWORD (environment) and expects a refusal;
//     prints the CONNACK code.
//
// Prints one line "ok ..." and exits 0 on success; otherwise prints why
// and exits 1. Never waits more than 20 s.
'use strict';
const fs = require('fs');
const mqtt = require('mqtt');

const [mode, url, version, caFile] = process.argv.slice(2);
const COUNT = 20;
const fail = (why) => {
  console.log(`FAIL ${why}`);
  process.exit(1);
};
setTimeout(() => fail('timed out'), 20000).unref();

const options = {
  protocolVersion: Number(version),
  clientId: `mqttjs-${mode}-${version}-${process.pid}`,
  clean: true,
  reconnectPeriod: 0,
  connectTimeout: 10000,
};
if (caFile) {
  options.ca = fs.readFileSync(caFile);
  options.rejectUnauthorized = true;
}
if (process.env.USER_NAME) {
  options.username = process.env.USER_NAME;
  options.password = process.env.PASSWORD;
}

const client = mqtt.connect(url, options);

if (mode === 'refused') {
  client.on('connect', () => fail('connected, expected a refusal'));
  client.on('error', (e) => {
    console.log(`ok refused code=${e.code}`);
    client.end(true, () => process.exit(0));
  });
} else if (mode === 'exchange') {
  const topic = `ws/${options.clientId}`;
  const received = [];
  client.on('error', (e) => fail(`error: ${e.message}`));
  client.on('message', (t, payload, packet) => {
    if (t !== topic) return;
    if (packet.qos !== 1) fail(`message at QoS ${packet.qos}, expected 1`);
    received.push(payload.toString());
    if (received.length === COUNT) {
      const expected = Array.from({ length: COUNT }, (_, i) => `m${i}`);
      if (received.join(',') !== expected.join(',')) {
        fail(`got ${received.join(',')}`);
      }
      client.publish('ws/cross', 'from-mqttjs', { qos: 1 }, (e) => {
        if (e) fail(`cross publish: ${e.message}`);
        console.log(`ok exchanged ${COUNT} version=${version}`);
        client.end(false, () => process.exit(0));
      });
    }
  });
  client.on('connect', () => {
    client.subscribe(topic, { qos: 1 }, (e, granted) => {
      if (e) fail(`subscribe: ${e.message}`);
      if (granted[0].qos !== 1) fail(`granted ${JSON.stringify(granted)}`);
      let i = 0;
      const next = () => {
        if (i === COUNT) return;
        client.publish(topic, `m${i++}`, { qos: 1 }, (e2) => {
          if (e2) fail(`publish: ${e2.message}`);
          next();
        });
      };
      next();
    });
  });
} else {
  fail(`unknown mode ${mode}`);
}

// What OpenPaaS ESN declares and does on RabbitMQ, with node's amqplib and its
// defaults (backend/core/amqp/, pubsubclient.js, messaging/point-to-point/):
//
//   node openpaas.js URL declare TOPICS_JSON
//       declare every topic's exchange and the collector's exchange, queue and
//       binding; print {"errors": [...]} (each refused declaration, if any).
//   node openpaas.js URL exchange TOPICS_JSON LISTEN MESSAGES_JSON TIMEOUT_MS
//       the same declarations, then subscribe to the topic LISTEN as ESN does
//       (server-named exclusive queue), publish each message to
//       collector:email as ESN's publishers do (no options), and print the
//       first message received on LISTEN: {"errors": [...], "received": ...}.
'use strict';
const amqp = require('amqplib');

const COLLECTOR = 'collector:email';
const [url, mode, topicsJson, listen, messagesJson, timeoutMs] = process.argv.slice(2);
const topics = JSON.parse(topicsJson);

async function declareAll(connection, errors) {
  // One channel per declaration: a refusal (406) closes its channel only,
  // and is reported with the broker's words.
  async function attempt(what, declare) {
    const channel = await connection.createChannel();
    channel.on('error', () => {});
    try {
      await declare(channel);
      await channel.close();
    } catch (e) {
      errors.push({ what, error: e.message });
    }
  }
  for (const topic of topics) {
    await attempt('exchange ' + topic, (ch) => ch.assertExchange(topic, 'fanout'));
  }
  await attempt('exchange ' + COLLECTOR, (ch) => ch.assertExchange(COLLECTOR, 'fanout'));
  await attempt('queue ' + COLLECTOR, (ch) => ch.assertQueue(COLLECTOR));
  await attempt('binding ' + COLLECTOR, (ch) => ch.bindQueue(COLLECTOR, COLLECTOR, ''));
}

async function main() {
  const connection = await amqp.connect(url);
  const errors = [];
  await declareAll(connection, errors);
  if (mode === 'declare') {
    process.stdout.write(JSON.stringify({ errors }) + '\n');
    await connection.close();
    return;
  }
  const channel = await connection.createChannel();
  await channel.assertExchange(listen, 'fanout');
  const q = await channel.assertQueue('', { exclusive: true, durable: false, autoDelete: true });
  await channel.bindQueue(q.queue, listen, '');
  const received = new Promise((resolve) => {
    channel.consume(q.queue, (message) => {
      channel.ack(message);
      resolve(JSON.parse(message.content.toString('utf8')));
    }, { noAck: false });
  });
  for (const message of JSON.parse(messagesJson)) {
    channel.publish(COLLECTOR, '', Buffer.from(JSON.stringify(message), 'utf8'));
  }
  const timeout = new Promise((resolve) => setTimeout(() => resolve(null), Number(timeoutMs)));
  const first = await Promise.race([received, timeout]);
  process.stdout.write(JSON.stringify({ errors, received: first }) + '\n');
  await connection.close();
}

main().catch((e) => {
  process.stdout.write(JSON.stringify({ fatal: e.message }) + '\n');
  process.exit(1);
});

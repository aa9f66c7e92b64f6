// The open-loop load generator of `python -m benches.grpc` (its unary phase), in Node's @grpc/grpc-js.
//
// Why Node and not Python: the generator runs on the same cores as the server it measures, so every
// microsecond it spends per call is taken from the server. grpcio's Python client costs about 0.3-0.4 ms of
// CPU per unary call on the reference VM; grpc-js, sending bytes that are already serialized, a fraction of
// that (the run reports it as `client_cpu_us_per_call`).
//
// Open loop, no coordinated omission: request n is due at start + n / rate, fixed before the run, whatever
// the answers do; its latency is measured from that due time, not from when it actually left, so a
// generator (or a machine) that falls behind shows as latency, never hides it. `send_lag` says how late
// the generator itself was. It sends everything due whenever it is awake: on a timer armed for the next
// due time, and after every answer (under load answers arrive more often than the timer's 1 ms grain).
//
// Input: one JSON object on stdin (so the bearer token never shows in a process list):
//   {"address": "127.0.0.1:50051", "token": "cc1_...", "payloads": "/path/file", "rate": 2000,
//    "start_ns": <CLOCK_MONOTONIC ns: Python's time.perf_counter_ns()>, "method": "/citycard.v1.Ledger/CreateTransfers",
//    "deadline_ms": 10000, "connections": 1, "warmup": 250}
// The payloads file holds serialized requests, each behind its length as a u32 little-endian.
// Output: one JSON object on stdout: per request the latency and send lag in microseconds (in due order)
// and its outcome ("OK", "REFUSED_TRANSFERS" when the answer lists transfers not booked, or the status
// code's name), the CPU the generator used from the first request after `warmup` on, and the span from
// that request's due time to the last answer.
'use strict';

const fs = require('fs');
const path = require('path');
const { createRequire } = require('module');

// The packages `npm ci --prefix examples/node-client` installed (make test does): nothing is fetched here.
const nodeClient = createRequire(path.resolve(__dirname, '..', 'examples', 'node-client', 'package.json'));
const grpc = nodeClient('@grpc/grpc-js');

const STATUS_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));
const MS_PER_NS = 1e-6;

function readPayloads(file) {
  const raw = fs.readFileSync(file);
  const payloads = [];
  for (let offset = 0; offset < raw.length;) {
    const length = raw.readUInt32LE(offset);
    payloads.push(raw.subarray(offset + 4, offset + 4 + length));
    offset += 4 + length;
  }
  return payloads;
}

function run(config) {
  const payloads = readPayloads(config.payloads);
  const count = payloads.length;
  const periodNs = 1e9 / config.rate;
  const startNs = Number(BigInt(config.start_ns));
  const warmup = Math.min(config.warmup || 0, count - 1);
  const clients = [];
  for (let c = 0; c < (config.connections || 1); c += 1) {
    // a channel option that differs per client keeps grpc-js from sharing one connection among them
    clients.push(new grpc.Client(config.address, grpc.credentials.createInsecure(), { 'citycard.bench.connection': c }));
  }
  const metadata = new grpc.Metadata();
  metadata.set('authorization', `Bearer ${config.token}`);
  const identity = (bytes) => bytes;
  const dueNs = (n) => startNs + n * periodNs;
  const latencyUs = new Float64Array(count).fill(NaN);
  const lagUs = new Float64Array(count).fill(NaN);
  const outcomes = new Array(count).fill('?');
  let next = 0;
  let answered = 0;
  let lastAnswerNs = 0;
  let timer = null;
  let cpuStart = null;

  return new Promise((resolve) => {
    const send = (n) => {
      if (n === warmup) cpuStart = process.cpuUsage();  // CPU is counted from the first counted request on
      const sentNs = Number(process.hrtime.bigint());
      lagUs[n] = (sentNs - dueNs(n)) / 1000;
      const client = clients[n % clients.length];
      client.makeUnaryRequest(config.method, identity, identity, payloads[n], metadata,
        { deadline: Date.now() + config.deadline_ms }, (error, answer) => {
          const nowNs = Number(process.hrtime.bigint());
          latencyUs[n] = (nowNs - dueNs(n)) / 1000;
          if (error) outcomes[n] = STATUS_NAMES[error.code] || String(error.code);
          else outcomes[n] = answer.length ? 'REFUSED_TRANSFERS' : 'OK';  // the answer lists only failures
          lastAnswerNs = nowNs;
          answered += 1;
          if (answered === count) {
            finish();
          } else {
            pump();
          }
        });
    };

    const pump = () => {
      const nowNs = Number(process.hrtime.bigint());
      while (next < count && dueNs(next) <= nowNs) {
        send(next);
        next += 1;
      }
      if (next < count && timer === null) {
        const waitMs = Math.max(0, Math.floor((dueNs(next) - nowNs) * MS_PER_NS));
        timer = setTimeout(() => { timer = null; pump(); }, waitMs);
      }
    };

    const finish = () => {
      const cpu = process.cpuUsage(cpuStart);
      for (const client of clients) client.close();
      resolve({
        latency_us: Array.from(latencyUs), send_lag_us: Array.from(lagUs), outcomes,
        span_s: (lastAnswerNs - dueNs(warmup)) / 1e9, cpu_s: (cpu.user + cpu.system) / 1e6,
      });
    };

    // Connect every channel before the clock starts, so the first requests do not pay for connecting.
    let ready = 0;
    for (const client of clients) {
      client.waitForReady(Date.now() + config.deadline_ms, (error) => {
        if (error) throw error;
        ready += 1;
        if (ready === clients.length) {
          const waitMs = Math.max(0, (startNs - Number(process.hrtime.bigint())) * MS_PER_NS);
          setTimeout(pump, Math.floor(waitMs));
        }
      });
    }
  });
}

function main() {
  const config = JSON.parse(fs.readFileSync(0, 'utf8'));
  run(config).then((report) => {
    process.stdout.write(JSON.stringify(report));
    process.exitCode = 0;
  });
}

main();

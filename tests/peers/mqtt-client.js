#!/usr/bin/env node
'use strict'
// Small MQTT.js command-line client for splicer tests.
//
//   node mqtt-client.js --url mqtt://127.0.0.3:1883 [--id ID] [--bind-host 127.0.0.2]
//       [--subscribe TOPIC --count N] [--publish TOPIC MSG]... [--qos 0|1|2]
//       [--retain] [--mqtt-version 4|5] [--username U] [--password P]
//       [--keepalive S] [--timeout-ms 5000] [--ws-header 'Name: value']...
//       [--ca FILE] [--cert FILE --key FILE] [--servername NAME]  (mqtts://, wss://)
//
// Order: connect, subscribe (waits for SUBACK), publish (QoS>0 waits for the
// ack), wait for --count messages, disconnect, exit 0.
// stdout: one JSON line per event: connected, subscribed, published, message.
// Exit 1 on error, 2 on bad arguments, 3 on timeout (message on stderr).

const net = require('node:net')
const tls = require('node:tls')
const fs = require('node:fs')
const mqtt = require('mqtt')
const WebSocket = require('ws')

function usage (msg) {
  if (msg) process.stderr.write(`mqtt-client: ${msg}\n`)
  process.stderr.write(
    'usage: node mqtt-client.js --url mqtt://HOST:PORT|ws://HOST:PORT/PATH [options]\n' +
    '  --id ID                 client id (default: random)\n' +
    '  --bind-host ADDR        local source address to bind (mqtt:// and ws://)\n' +
    '  --subscribe TOPIC       subscribe before publishing (repeatable)\n' +
    '  --count N               messages to wait for after subscribing (default 1 if subscribing)\n' +
    '  --publish TOPIC MSG     publish MSG to TOPIC (repeatable)\n' +
    '  --qos 0|1|2             QoS for subscribe and publish (default 0)\n' +
    '  --retain                publish with the retain flag\n' +
    '  --mqtt-version 3|4|5    protocol level (default 4 = MQTT 3.1.1)\n' +
    '  --username U --password P\n' +
    '  --keepalive S           keepalive seconds (default 30)\n' +
    '  --timeout-ms MS         overall deadline (default 5000)\n' +
    '  --ws-header "N: v"      extra HTTP header on the WebSocket upgrade (repeatable)\n' +
    '  --ca FILE               mqtts/wss: trust only this CA (the server certificate is checked)\n' +
    '  --cert FILE --key FILE  mqtts/wss: client certificate\n' +
    '  --servername NAME       mqtts/wss: SNI (default: the URL host)\n')
  process.exit(2)
}

function parseArgs (argv) {
  const o = {
    url: null,
    id: null,
    bindHost: null,
    subscribe: [],
    count: null,
    publish: [],
    qos: 0,
    retain: false,
    mqttVersion: 4,
    username: undefined,
    password: undefined,
    keepalive: 30,
    timeoutMs: 5000,
    wsHeaders: {},
    ca: null,
    cert: null,
    key: null,
    servername: null
  }
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]
    const val = () => {
      if (i + 1 >= argv.length) usage(`${a} needs a value`)
      return argv[++i]
    }
    const int = (min, max) => {
      const v = val()
      const n = Number(v)
      if (!Number.isInteger(n) || n < min || n > max) usage(`${a}: bad value ${v}`)
      return n
    }
    switch (a) {
      case '--url': o.url = val(); break
      case '--id': o.id = val(); break
      case '--bind-host': o.bindHost = val(); break
      case '--subscribe': o.subscribe.push(val()); break
      case '--count': o.count = int(0, 1e9); break
      case '--publish': {
        const topic = val()
        const msg = val()
        o.publish.push({ topic, msg })
        break
      }
      case '--qos': o.qos = int(0, 2); break
      case '--retain': o.retain = true; break
      case '--mqtt-version': o.mqttVersion = int(3, 5); break
      case '--username': o.username = val(); break
      case '--password': o.password = val(); break
      case '--keepalive': o.keepalive = int(0, 65535); break
      case '--timeout-ms': o.timeoutMs = int(1, 1e9); break
      case '--ws-header': {
        const h = val()
        const idx = h.indexOf(':')
        if (idx <= 0) usage(`--ws-header wants "Name: value", got ${h}`)
        const name = h.slice(0, idx).trim()
        const value = h.slice(idx + 1).trim()
        // repeated header names are joined the way HTTP allows (comma list)
        o.wsHeaders[name] = o.wsHeaders[name] !== undefined ? `${o.wsHeaders[name]}, ${value}` : value
        break
      }
      case '--ca': o.ca = val(); break
      case '--cert': o.cert = val(); break
      case '--key': o.key = val(); break
      case '--servername': o.servername = val(); break
      case '-h': case '--help': usage(); break
      default: usage(`unknown argument ${a}`)
    }
  }
  if (!o.url) usage('--url is required')
  if (o.count === null) o.count = o.subscribe.length ? 1 : 0
  if (o.count > 0 && !o.subscribe.length) usage('--count needs --subscribe')
  if (o.mqttVersion === 2) usage('--mqtt-version must be 3, 4 or 5')
  return o
}

function emit (obj) {
  process.stdout.write(JSON.stringify(obj) + '\n')
}

function main () {
  const o = parseArgs(process.argv.slice(2))
  let url
  try {
    url = new URL(o.url)
  } catch (e) {
    usage(`bad --url ${o.url}`)
  }
  const proto = url.protocol.replace(/:$/, '')
  if (!['mqtt', 'tcp', 'ws', 'mqtts', 'wss'].includes(proto)) usage(`unsupported scheme ${proto}: (mqtt://, tcp://, ws://, mqtts://, wss://)`)
  if (Object.keys(o.wsHeaders).length && !proto.startsWith('ws')) usage('--ws-header only applies to ws:// and wss:// URLs')
  const secure = proto === 'mqtts' || proto === 'wss'
  // What the TLS client is given: the server certificate is always checked.
  const tlsOptions = {}
  if (secure) {
    tlsOptions.rejectUnauthorized = true
    if (o.ca) tlsOptions.ca = fs.readFileSync(o.ca)
    if (o.cert) tlsOptions.cert = fs.readFileSync(o.cert)
    if (o.key) tlsOptions.key = fs.readFileSync(o.key)
    tlsOptions.servername = o.servername || new URL(o.url).hostname
  }

  const clientId = o.id || `splicer-test-${process.pid}-${Math.random().toString(16).slice(2, 8)}`
  const options = {
    clientId,
    protocolVersion: o.mqttVersion,
    keepalive: o.keepalive,
    clean: true,
    reconnectPeriod: 0, // a test client never retries by itself
    connectTimeout: o.timeoutMs,
    username: o.username,
    password: o.password
  }

  let client
  let websocket = null
  let stage = 'connect'
  let done = false
  const finish = (code, msg) => {
    if (done) return
    done = true
    clearTimeout(timer)
    if (msg) process.stderr.write(`mqtt-client: ${msg}\n`)
    const exit = () => process.exit(code)
    if (client && client.connected && code === 0) {
      client.end(false, {}, exit)
      setTimeout(exit, 1000).unref()
    } else {
      if (client) client.end(true)
      exit()
    }
  }
  const timer = setTimeout(() => {
    finish(3, `timeout after ${o.timeoutMs} ms during ${stage}` +
      (stage === 'messages' ? ` (got ${received}/${o.count})` : ''))
  }, o.timeoutMs)

  if (proto === 'ws' || proto === 'wss') {
    const wsOptions = { headers: o.wsHeaders, ...tlsOptions }
    if (o.bindHost) wsOptions.localAddress = o.bindHost // passed on to http.request
    client = mqtt.connect(o.url, {
      ...options,
      wsOptions,
      // build the WebSocket ourselves only to keep a handle on its TCP socket
      createWebsocket: (wsUrl, protocols) => {
        websocket = new WebSocket(wsUrl, protocols, wsOptions)
        return websocket
      }
    })
  } else {
    const host = url.hostname.replace(/^\[|\]$/g, '')
    const port = url.port ? Number(url.port) : 1883
    // MQTT.js's own tcp builder does not pass localAddress on to
    // net.createConnection, so build the stream ourselves.
    const streamBuilder = () => {
      const copts = { host, port, ...tlsOptions }
      if (o.bindHost) copts.localAddress = o.bindHost
      return secure ? tls.connect(copts) : net.createConnection(copts)
    }
    client = new mqtt.MqttClient(streamBuilder, { ...options, host, port, protocol: 'mqtt' })
  }

  let received = 0
  client.on('error', (err) => finish(1, `error during ${stage}: ${err.message}`))
  client.on('close', () => {
    if (!done) finish(1, `connection closed during ${stage}`)
  })
  client.on('message', (topic, payload) => {
    if (stage !== 'messages' && stage !== 'publish' && stage !== 'subscribe') return
    received++
    emit({ event: 'message', topic, payload: payload.toString('utf8') })
    if (stage === 'messages' && received >= o.count) finish(0)
  })

  client.on('connect', async (connack) => {
    const local = websocket ? websocket._socket : client.stream
    emit({
      event: 'connected',
      id: clientId,
      sessionPresent: !!connack.sessionPresent,
      localAddress: local ? local.localAddress : null,
      localPort: local ? local.localPort : null,
      // mqtts/wss: the CN of the certificate the server presented
      serverCN: local && local.getPeerCertificate ? ((local.getPeerCertificate().subject || {}).CN || null) : null
    })
    try {
      if (o.subscribe.length) {
        stage = 'subscribe'
        const granted = await client.subscribeAsync(o.subscribe, { qos: o.qos })
        for (const g of granted) {
          if (g.qos === 128) throw new Error(`subscription to ${g.topic} refused`)
        }
        emit({ event: 'subscribed', granted: granted.map(g => ({ topic: g.topic, qos: g.qos })) })
      }
      for (const p of o.publish) {
        stage = 'publish'
        await client.publishAsync(p.topic, p.msg, { qos: o.qos, retain: o.retain })
        emit({ event: 'published', topic: p.topic, qos: o.qos })
      }
      stage = 'messages'
      if (received >= o.count) finish(0)
    } catch (err) {
      finish(1, `error during ${stage}: ${err.message}`)
    }
  })
}

main()

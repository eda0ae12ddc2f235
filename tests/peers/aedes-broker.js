#!/usr/bin/env node
'use strict'
// Real MQTT broker peer for splicer tests: aedes + aedes-protocol-decoder.
//
//   node aedes-broker.js --host 127.0.0.4 --port 1883 [--ws-port 8083]
//
// Every connection goes through aedes-protocol-decoder before aedes sees it
// (the same wiring aedes-server-factory uses with trustProxy: true), so the
// client ip reported is the PROXY protocol v1/v2 source address on TCP, or the
// X-Real-IP / X-Forwarded-For address on a WebSocket upgrade.
//
// Prints one JSON line per event on stdout:
//   {"event":"ready","host":..,"port":N,"wsPort":M|null}
//   {"event":"client","id":..,"ip":..,"port":..,"isProxy":..,"transport":"tcp"|"ws","source":"decoder"|"socket",...}
//   {"event":"publish","topic":..,"payload":"<utf8>","client":"<id>",...}
//   {"event":"subscribe",...} {"event":"disconnect",...} {"event":"decode-error",...} {"event":"stopped"}
// Exits 0 on SIGTERM / SIGINT.

const net = require('node:net')
const http = require('node:http')
const { WebSocketServer, createWebSocketStream } = require('ws')
const { protocolDecoder } = require('aedes-protocol-decoder')

function usage (msg) {
  if (msg) process.stderr.write(`aedes-broker: ${msg}\n`)
  process.stderr.write('usage: node aedes-broker.js --host ADDR --port N [--ws-port M]\n' +
    '  --host     listen address (127.0.0.0/8), default 127.0.0.1\n' +
    '  --port     MQTT/TCP port (0 = any free port; the real one is in the ready line)\n' +
    '  --ws-port  also serve MQTT over WebSocket on this port, any path (e.g. /mqtt)\n')
  process.exit(2)
}

function parseArgs (argv) {
  const opts = { host: '127.0.0.1', port: 1883, wsPort: null }
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]
    const val = () => {
      if (i + 1 >= argv.length) usage(`${a} needs a value`)
      return argv[++i]
    }
    const num = () => {
      const v = val()
      const n = Number(v)
      if (!Number.isInteger(n) || n < 0 || n > 65535) usage(`${a}: bad port ${v}`)
      return n
    }
    switch (a) {
      case '--host': opts.host = val(); break
      case '--port': opts.port = num(); break
      case '--ws-port': opts.wsPort = num(); break
      case '-h': case '--help': usage()
      // falls through (usage exits)
      default: usage(`unknown argument ${a}`)
    }
  }
  return opts
}

function emit (obj) {
  // process.stdout is synchronous for files and pipes on Linux, so each line
  // is flushed as soon as it is written.
  process.stdout.write(JSON.stringify(obj) + '\n')
}

const V1_SIG = Buffer.from('PROXY ', 'latin1')
const V2_SIG = Buffer.from('0d0a0d0a000d0a515549540a', 'hex')

function isPrefixOf (buf, sig) {
  const n = Math.min(buf.length, sig.length)
  return buf.subarray(0, n).equals(sig.subarray(0, n))
}

// aedes-protocol-decoder parses whatever the first read() returned and throws
// if a PROXY header is cut in two. To not depend on TCP segmentation, keep
// reading until the whole header (if any) is buffered.
function headerComplete (buf) {
  if (buf.length === 0) return false
  if (isPrefixOf(buf, V1_SIG)) {
    if (buf.length < V1_SIG.length) return false
    // v1 header is at most 107 bytes including CRLF; past that let the decoder fail
    return buf.indexOf('\r\n') !== -1 || buf.length > 107
  }
  if (isPrefixOf(buf, V2_SIG)) {
    if (buf.length < 16) return false
    return buf.length >= 16 + buf.readUInt16BE(14)
  }
  return true
}

// Equivalent of aedes-server-factory's bindConnection() with trustProxy: true.
function bindConnection (broker, conn, req, transport, socket) {
  let buffered = Buffer.alloc(0)
  const cleanup = () => {
    conn.removeListener('readable', onReadable)
    conn.removeListener('error', onError)
    conn.removeListener('close', onClose)
  }
  const onError = (err) => {
    cleanup()
    emit({ event: 'connection-error', transport, socketIp: socket.remoteAddress || null, error: err.message })
  }
  const onClose = () => { cleanup() }
  const onReadable = () => {
    let chunk
    while ((chunk = conn.read()) !== null) {
      buffered = buffered.length ? Buffer.concat([buffered, chunk]) : chunk
    }
    if (!headerComplete(buffered)) return
    cleanup()
    let details
    try {
      details = broker.decodeProtocol(conn, buffered, req)
    } catch (err) {
      emit({ event: 'decode-error', transport, socketIp: socket.remoteAddress || null, socketPort: socket.remotePort || null, error: err.message, head: buffered.subarray(0, 120).toString('latin1') })
      conn.destroy()
      return
    }
    req.connDetails = details
    conn.pause()
    conn.unshift(details.data || buffered)
    broker.handle(conn, req)
  }
  conn.on('readable', onReadable)
  conn.on('error', onError)
  conn.on('close', onClose)
}

async function main () {
  const opts = parseArgs(process.argv.slice(2))
  const { Aedes } = await import('aedes')

  const broker = await Aedes.createBroker({
    // aedes 1.x keeps these options but no longer calls them itself; the
    // listeners below call broker.decodeProtocol on each new connection.
    decodeProtocol: protocolDecoder,
    trustProxy: true,
    preConnect (client, packet, done) {
      // as in aedes-protocol-decoder's README
      if (client.connDetails && client.connDetails.ipAddress) {
        client.ip = client.connDetails.ipAddress
      }
      done(null, true)
    }
  })

  const info = new WeakMap() // client -> { transport, socket }

  broker.on('client', (client) => {
    const d = client.connDetails || {}
    const meta = info.get(client.conn) || {}
    const sock = meta.socket || {}
    const fromDecoder = !!d.ipAddress
    emit({
      event: 'client',
      id: client.id,
      ip: fromDecoder ? d.ipAddress : (sock.remoteAddress || null),
      port: fromDecoder ? (d.port ?? null) : (sock.remotePort ?? null),
      isProxy: d.isProxy ?? null,
      transport: meta.transport || null,
      source: fromDecoder ? 'decoder' : 'socket',
      ipFamily: d.ipFamily ?? null,
      serverIp: d.serverIpAddress ?? null,
      serverPort: d.serverPort ?? null,
      socketIp: sock.remoteAddress || null,
      socketPort: sock.remotePort ?? null,
      headers: meta.transport === 'ws' && client.req && client.req.headers
        ? pickHeaders(client.req.headers)
        : undefined
    })
  })

  broker.on('clientDisconnect', (client) => {
    emit({ event: 'disconnect', id: client.id })
  })

  broker.on('subscribe', (subs, client) => {
    if (!client) return
    emit({ event: 'subscribe', client: client.id, subscriptions: subs.map(s => ({ topic: s.topic, qos: s.qos })) })
  })

  broker.on('publish', (packet, client) => {
    if (!client) return // broker-internal ($SYS) publishes
    emit({
      event: 'publish',
      topic: packet.topic,
      payload: Buffer.isBuffer(packet.payload) ? packet.payload.toString('utf8') : String(packet.payload),
      client: client.id,
      qos: packet.qos,
      retain: !!packet.retain
    })
  })

  broker.on('clientError', (client, err) => {
    emit({ event: 'client-error', id: client.id, error: err.message })
  })
  broker.on('connectionError', (client, err) => {
    emit({ event: 'connection-error', error: err.message })
  })

  const sockets = new Set()
  const track = (s) => { sockets.add(s); s.on('close', () => sockets.delete(s)) }

  const tcpServer = net.createServer((conn) => {
    track(conn)
    info.set(conn, { transport: 'tcp', socket: conn })
    bindConnection(broker, conn, {}, 'tcp', conn)
  })

  let httpServer = null
  let wss = null
  if (opts.wsPort !== null) {
    httpServer = http.createServer((req, res) => {
      res.writeHead(426, { 'content-type': 'text/plain' })
      res.end('MQTT over WebSocket only\n')
    })
    httpServer.on('connection', track)
    // no `path`: accept the upgrade on any path (/mqtt, /, ...)
    wss = new WebSocketServer({
      server: httpServer,
      handleProtocols: (protocols) => protocols.has('mqtt') ? 'mqtt' : (protocols.has('mqttv3.1') ? 'mqttv3.1' : false)
    })
    wss.on('error', (err) => emit({ event: 'ws-error', error: err.message }))
    wss.on('connection', (websocket, req) => {
      const stream = createWebSocketStream(websocket)
      // aedes-protocol-decoder reads the TCP socket through `_socket`
      stream._socket = websocket._socket
      stream.on('error', () => {})
      info.set(stream, { transport: 'ws', socket: websocket._socket })
      bindConnection(broker, stream, req, 'ws', websocket._socket)
    })
  }

  const listen = (server, port) => new Promise((resolve, reject) => {
    server.once('error', reject)
    server.listen(port, opts.host, () => {
      server.removeListener('error', reject)
      resolve(server.address().port)
    })
  })

  const port = await listen(tcpServer, opts.port)
  const wsPort = httpServer ? await listen(httpServer, opts.wsPort) : null
  emit({ event: 'ready', host: opts.host, port, wsPort })

  let stopping = false
  const stop = (signal) => {
    if (stopping) return
    stopping = true
    const force = setTimeout(() => process.exit(0), 3000)
    force.unref()
    tcpServer.close()
    if (wss) {
      for (const c of wss.clients) c.terminate()
      wss.close()
    }
    if (httpServer) httpServer.close()
    broker.close(() => {
      for (const s of sockets) s.destroy()
      emit({ event: 'stopped', signal })
      process.exit(0)
    })
  }
  process.on('SIGTERM', () => stop('SIGTERM'))
  process.on('SIGINT', () => stop('SIGINT'))
}

function pickHeaders (h) {
  const out = {}
  for (const k of ['x-forwarded-for', 'x-forwarded-port', 'x-real-ip', 'forwarded']) {
    if (h[k] !== undefined) out[k] = h[k]
  }
  return out
}

main().catch((err) => {
  process.stderr.write(`aedes-broker: ${err && err.stack ? err.stack : err}\n`)
  process.exit(1)
})

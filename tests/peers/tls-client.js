#!/usr/bin/env node
'use strict'
// A TLS client for splicer tests (Node's TLS, which is OpenSSL's).
//
//   node tls-client.js --host H --port P [--bind ADDR] [--servername NAME]
//       [--ca FILE] [--cert FILE --key FILE] [--max-version TLSv1.2] [--alpn a,b] [--sigalgs LIST]
//       [--before HEX] [--send FILE] [--hold-ms N] [--out FILE]
//
// Connects from --bind, writes the --before bytes in the clear (a PROXY
// header), then does the handshake (the server certificate is checked
// against --ca when given). Sends --send (its first half, then after
// --hold-ms the rest), half-closes (close_notify, then FIN), and reads until
// the server ends; what it read goes to --out.
// --sigalgs: the signature algorithms offered (OpenSSL's names, colon-separated).
// stdout: {"event":"secure","cn":..,"protocol":..,"alpn":..,"key":"EC"|"RSA"} then
// {"event":"end","bytes":N}. Exit 1 on any error, a close before the
// handshake finished included (message on stderr).

const net = require('node:net')
const tls = require('node:tls')
const fs = require('node:fs')

const o = { host: null, port: null, bind: undefined, servername: undefined, ca: null, cert: null, key: null, maxVersion: undefined, alpn: null, sigalgs: undefined, before: '', send: null, holdMs: 0, out: null }
const argv = process.argv.slice(2)
for (let i = 0; i < argv.length; i++) {
  const v = () => argv[++i]
  switch (argv[i]) {
    case '--host': o.host = v(); break
    case '--port': o.port = Number(v()); break
    case '--bind': o.bind = v(); break
    case '--servername': o.servername = v(); break
    case '--ca': o.ca = v(); break
    case '--cert': o.cert = v(); break
    case '--key': o.key = v(); break
    case '--max-version': o.maxVersion = v(); break
    case '--alpn': o.alpn = v().split(','); break
    case '--sigalgs': o.sigalgs = v(); break
    case '--before': o.before = v(); break
    case '--send': o.send = v(); break
    case '--hold-ms': o.holdMs = Number(v()); break
    case '--out': o.out = v(); break
    default: process.stderr.write(`tls-client: unknown argument ${argv[i]}\n`); process.exit(2)
  }
}

const fail = (msg) => { process.stderr.write(`tls-client: ${msg}\n`); process.exit(1) }
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

const raw = net.connect({ host: o.host, port: o.port, localAddress: o.bind }, () => {
  if (o.before) raw.write(Buffer.from(o.before, 'hex'))
  const opts = { socket: raw, rejectUnauthorized: !!o.ca, maxVersion: o.maxVersion, sigalgs: o.sigalgs }
  if (o.servername) opts.servername = o.servername
  if (o.alpn) opts.ALPNProtocols = o.alpn
  if (o.ca) opts.ca = fs.readFileSync(o.ca)
  if (o.cert) opts.cert = fs.readFileSync(o.cert)
  if (o.key) opts.key = fs.readFileSync(o.key)
  let secure = false
  const s = tls.connect(opts, () => {
    secure = true
    const cert = s.getPeerCertificate()
    const key = cert.asn1Curve ? 'EC' : (cert.modulus ? 'RSA' : null)
    emit({ event: 'secure', cn: (cert.subject || {}).CN || null, protocol: s.getProtocol(), alpn: s.alpnProtocol || null, key })
    const data = o.send ? fs.readFileSync(o.send) : Buffer.alloc(0)
    const half = Math.floor(data.length / 2)
    s.write(data.subarray(0, half))
    setTimeout(() => { s.end(data.subarray(half)) }, o.holdMs)
  })
  const got = []
  let bytes = 0
  s.on('data', (d) => { got.push(d); bytes += d.length })
  s.on('end', () => {
    // A server that closes before the handshake is done refused it.
    if (!secure) fail('the server closed before the handshake finished')
    if (o.out) fs.writeFileSync(o.out, Buffer.concat(got))
    emit({ event: 'end', bytes })
    process.exit(0)
  })
  s.on('error', (e) => fail(e.message))
})
raw.on('error', (e) => fail(e.message))

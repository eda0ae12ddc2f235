//! One client connection from accept to close: find out who the client is
//! (ingress), on an MQTT listener read its CONNECT, pick and connect an
//! upstream (upstream), tell it who the client is (PROXY header, rewritten
//! upgrade request) and, on a WebSocket listener, wait for it to switch
//! protocols; then hand both sockets to the datapath, and log one line at
//! the end (close.rs).
mod close;

use std::{
    fmt,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use splicer_proto::{
    http_upgrade::Refusal,
    mqtt::{self as mqtt_packet, Connect},
    trust::{self, Trusted},
};
use tokio::{
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
};

use self::close::{Named, Route, Said};
use crate::{
    config::{HealthCheck, Listener},
    datapath::{
        carried::{Carried, ClientAddrs, Early, Owner, Totals},
        Datapath,
    },
    ingress::{
        access::Access,
        client::Client,
        inbox::Inbox,
        limit::{Limited, Limits, LogGate},
        mqtt::{self, Framing, NoConnect, Session},
        proxy_header::{self, Rejection},
        tls::{self as hello, TlsSession},
        websocket,
    },
    metrics::{ByReason, CloseReason, ListenerMetrics, Metrics, MqttMetrics, Reject},
    net,
    tls::{self, conn::TlsConn},
    upstream::{
        balance::Balancer,
        health::{Failure, UpstreamState},
        sni::SniRouter,
    },
};

/// What a listener's connections share. A reload builds a new one; live
/// connections keep the one they started with.
pub struct ListenerCtx {
    pub config: Listener,
    pub trusted: Trusted,
    pub access: Access,
    /// Kept across reloads that leave the limits as they were, so a
    /// reload in a storm does not hand every source a new burst.
    limits: Arc<Limits>,
    limited_log: LogGate,
    handshake_log: LogGate,
    /// Every upstream of the listener (health checks go through it).
    pub balancer: Balancer,
    /// On `tls-passthrough` listeners with `sni`: the groups by name.
    sni: Option<SniRouter>,
    pub datapath: Arc<Datapath>,
    pub metrics: ListenerMetrics,
    /// Some on MQTT listeners.
    mqtt_metrics: Option<MqttMetrics>,
    /// Some on TLS passthrough listeners: ClientHello rejections by reason.
    tls_rejections: Option<ByReason>,
    /// Some on listeners that terminate TLS: failed handshakes by reason.
    tls_handshake_failures: Option<ByReason>,
    /// One per upstream, in the balancer's order: what a connection to it
    /// reports its end to.
    routes: Vec<Arc<Route>>,
    /// A slot per client in its handshake (max-handshakes).
    pub handshakes: Arc<Semaphore>,
}

impl ListenerCtx {
    /// `previous` is the same listener before a reload: upstreams it
    /// already had keep their health state and connection counts.
    pub fn new(
        config: Listener,
        datapath: Arc<Datapath>,
        metrics: &Metrics,
        previous: Option<&ListenerCtx>,
    ) -> Self {
        let upstreams: Vec<(Arc<UpstreamState>, u32)> = config
            .upstreams
            .iter()
            .map(|u| {
                let state = previous
                    .and_then(|p| p.balancer.upstreams().find(|s| s.addr == u.addr).cloned())
                    .unwrap_or_else(|| {
                        let m = metrics.upstream(&config.name, &u.addr.to_string());
                        Arc::new(UpstreamState::new(&config.name, u.addr, m))
                    });
                if config.health.check == HealthCheck::Off {
                    state.force_up();
                }
                (state, u.weight)
            })
            .collect();
        // Upstreams no longer listed leave /metrics.
        for old in previous.iter().flat_map(|p| p.balancer.upstreams()) {
            if !config.upstreams.iter().any(|u| u.addr == old.addr) {
                metrics.forget_upstream(&config.name, &old.addr.to_string());
            }
        }
        // Unchanged TLS files keep their session tickets and cache: a reload
        // of other keys must not make every client do a full handshake.
        let mut config = config;
        if let Some(p) = previous.filter(|p| p.config.terminate.is_some() && p.config.terminate == config.terminate) {
            config.terminate.clone_from(&p.config.terminate);
        }
        let listener_metrics = metrics.listener(&config.name);
        let certs = |l: &Listener| l.terminate.iter().flat_map(|t| t.certs.clone()).collect::<Vec<_>>();
        for old in previous.map(|p| certs(&p.config)).unwrap_or_default() {
            metrics.tls_cert(&config.name, &old, None);
        }
        for cert in certs(&config) {
            metrics.tls_cert(&config.name, &cert, Some(cert.not_after));
        }
        let routes = upstreams
            .iter()
            .map(|(u, _)| Arc::new(Route::new(&config.name, &listener_metrics, u.clone())))
            .collect();
        ListenerCtx {
            trusted: Trusted::new(&config.trusted_proxies),
            access: Access::new(&config.allow, &config.deny),
            limits: previous
                .filter(|p| *p.limits.config() == config.rate_limit)
                .map_or_else(|| Arc::new(Limits::new(config.rate_limit)), |p| p.limits.clone()),
            limited_log: LogGate::default(),
            handshake_log: LogGate::default(),
            sni: config.tls.as_ref().filter(|t| !t.groups.is_empty()).map(|t| {
                SniRouter::new(config.balance, &t.groups, |u| {
                    let (state, _) = upstreams.iter().find(|(s, _)| s.addr == u.addr).expect("groups' upstreams are the listener's");
                    state.clone()
                })
            }),
            balancer: Balancer::new(config.balance, upstreams),
            metrics: listener_metrics,
            tls_rejections: config
                .tls
                .as_ref()
                .map(|_| metrics.tls_hello(&config.name, &hello::NO_HELLO_LABELS)),
            tls_handshake_failures: config
                .terminate
                .as_ref()
                .map(|_| metrics.tls_handshake(&config.name, &tls::conn::HANDSHAKE_FAILURE_LABELS)),
            mqtt_metrics: config
                .mqtt
                .map(|_| metrics.mqtt(&config.name, &mqtt::NO_CONNECT_LABELS)),
            datapath,
            routes,
            handshakes: Arc::new(Semaphore::new(config.max_handshakes)),
            config,
        }
    }

    fn route(&self, upstream: &Arc<UpstreamState>) -> Arc<Route> {
        self.routes
            .iter()
            .find(|r| r.leads_to(upstream))
            .expect("every upstream of the balancer has a route")
            .clone()
    }
}

/// Serves one accepted client; the accept loop has counted it, and holds
/// one of the listener's handshake slots for it.
pub async fn handle(ctx: Arc<ListenerCtx>, tcp: TcpStream, peer: SocketAddr, handshake: OwnedSemaphorePermit) {
    if let Some(reason) = serve(&ctx, tcp, peer, handshake).await {
        ctx.metrics.closed(reason);
    }
}

/// Some when the client was turned away before reaching an upstream; None
/// once it reached one (its Route counts the close).
async fn serve(
    ctx: &Arc<ListenerCtx>,
    tcp: TcpStream,
    peer: SocketAddr,
    handshake: OwnedSemaphorePermit,
) -> Option<CloseReason> {
    let started = Instant::now();
    // An IPv4 client on a dual-stack listener is logged as IPv4, as trusted.
    let peer = SocketAddr::new(trust::canonical(peer.ip()), peer.port());
    let name = &ctx.config.name;
    let m = &ctx.metrics;
    let mut inbox = Inbox::new(&tcp);
    let mut id = match proxy_header::identify(&ctx.config, &ctx.trusted, &mut inbox, peer).await {
        Ok(id) => id,
        Err(why) => {
            m.rejected(match why {
                Rejection::Untrusted => Reject::untrusted_proxy_header,
                _ => Reject::bad_proxy_header,
            });
            log::warn!("[{name}] {peer}: rejected: {why}");
            return Some(CloseReason::rejected);
        }
    };
    if let (Some((h, _)), false) = (&id.inbound, id.trusted) {
        m.untrusted_ignored();
        log::warn!(
            "[{name}] {peer}: PROXY header from an untrusted peer ignored (it claimed {}); using the peer's address",
            h.addresses.map_or("no address".into(), |(src, _)| src.to_string())
        );
    }
    let Ok(local) = tcp.local_addr() else {
        return Some(CloseReason::error);
    };
    let held = inbox.into_rest();
    let mut consumed = id.inbound.as_ref().map_or(0, |(_, raw)| raw.len() as u64);
    let mut who = ClientAddrs { peer, real: id.client };
    // Unless an upgrade request may name another client, the client is
    // known now: refuse it before any TLS handshake (what a storm of
    // reconnects costs most). A plaintext WebSocket client is refused
    // after its request, with an HTTP answer.
    let known_now = match &ctx.config.ws {
        None => true,
        // An untrusted peer's real-ip-header is not read: it is the client.
        Some(ws) => {
            ctx.config.terminate.is_some()
                && (ws.real_ip_header.is_none() || !ctx.trusted.contains(id.client.ip()))
        }
    };
    if known_now && !admit(ctx, who, None).await {
        return Some(CloseReason::rejected);
    }
    let mut tls_facts = None;
    let (client, held) = match &ctx.config.terminate {
        None => (Client::Plain(tcp), held),
        Some(t) => match TlsConn::accept(tcp, t, &held).await {
            Ok((c, facts)) => {
                tls_facts = Some(facts);
                (Client::Tls(Box::new(c)), Vec::new())
            }
            Err(why) => {
                m.rejected(Reject::bad_tls_handshake);
                if let Some(r) = &ctx.tls_handshake_failures {
                    r.inc(why.label());
                }
                // Scanners fail handshakes by the thousand: a line a second.
                if let Some(unlogged) = ctx.handshake_log.pass(Instant::now()) {
                    let more = fmt::from_fn(|f| match unlogged {
                        0 => Ok(()),
                        n => write!(f, " ({n} more since the last such line)"),
                    });
                    log::warn!("[{name}] {}: refused: {why}{more}", close::who(who));
                }
                return Some(CloseReason::rejected);
            }
        },
    };
    let facts = tls_facts;
    let mut inbox = Inbox::resume(&client, held);
    let mut head = Vec::new();
    if let Some(ws) = &ctx.config.ws {
        match websocket::upgrade(ws, &ctx.trusted, &mut inbox, id.client).await {
            Ok(up) => {
                // The header resolution may name an earlier client, whose
                // port is then known only if its entry gave one (0: unknown,
                // also in a PROXY header sent on).
                id.client = SocketAddr::new(up.client, up.port.unwrap_or(0));
                consumed += up.consumed as u64;
                head = up.head;
            }
            Err(refusal) => {
                m.rejected(Reject::bad_websocket_request);
                log::warn!(
                    "[{name}] {peer}: refused WebSocket upgrade ({}): {refusal:?}",
                    refusal.status()
                );
                return Some(CloseReason::rejected);
            }
        }
        who.real = id.client;
        if !known_now && !admit(ctx, who, Some(&client)).await {
            return Some(CloseReason::rejected);
        }
    }
    // Client bytes behind the preambles (the CONNECT among them) go
    // upstream only once the upstream has been told who the client is (and,
    // on a WebSocket listener, has switched protocols).
    //
    // MQTT over TCP: the CONNECT, before any upstream is touched. Who
    // connects picks the broker (balance = "client-id"). Like the
    // ClientHello below, it stays in the inbox, first of the client's bytes.
    let mut connect = None;
    if ctx.config.mqtt.is_some() && ctx.config.ws.is_none() {
        let Some(c) = read_connect(ctx, &mut inbox, Framing::Tcp, who).await else {
            return Some(CloseReason::rejected);
        };
        connect = Some(c);
    }
    // TLS passthrough: the ClientHello, whose server name picks the group.
    let mut balancer = &ctx.balancer;
    let mut passed = None;
    if let Some(opts) = &ctx.config.tls {
        let h = match hello::read_hello(opts, &mut inbox).await {
            Ok(h) => h,
            Err(why) => {
                m.rejected(Reject::bad_tls_hello);
                if let Some(r) = &ctx.tls_rejections {
                    r.inc(why.label());
                }
                log::warn!("[{name}] {}: refused: {why}", close::who(who));
                return Some(CloseReason::rejected);
            }
        };
        let said = TlsSession::passed(h.sni);
        if let Some(router) = &ctx.sni {
            let Some(group) = router.group(said.sni.as_deref()) else {
                m.rejected(Reject::unknown_sni);
                log::warn!("[{name}] {}: refused: no upstream group for {said}", close::who(who));
                return Some(CloseReason::rejected);
            };
            balancer = group;
        }
        passed = Some(said);
    }
    let client_id = connect.as_ref().map(|c| c.client_id.as_str());
    let upstream = connect_upstream(ctx, balancer, who.real, client_id).await;
    // From here on only what the log shows of the first packet is kept.
    let mut said = Said {
        tls: passed.or_else(|| facts.as_ref().map(TlsSession::terminated)),
        mqtt: connect.as_ref().map(Session::from),
    };
    let Some((upstream, state)) = upstream else {
        m.rejected(Reject::upstream_down);
        let of = match ctx.sni.is_some() {
            true => " of its sni group",
            false => "",
        };
        log::warn!(
            "[{name}] {}: every upstream{of} is down, closing the client",
            close::named(who, Some(&said))
        );
        match &said.mqtt {
            Some(s) => client.answer_and_close(mqtt_packet::unavailable(s.version)).await,
            None => refuse(ctx, &client, Refusal::BadGateway).await,
        }
        return Some(CloseReason::rejected);
    };
    let _ = client.tcp().set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    state.metrics.active.inc();
    let route = ctx.route(&state);
    // Tell the broker who the client is: the PROXY header (with the TLS
    // this listener terminated), then the rewritten upgrade request.
    let tlvs = facts.as_ref().map(tls::Facts::tlvs);
    let mut told = proxy_header::upstream_header(&ctx.config, &id, local, tlvs.as_deref()).unwrap_or_default();
    told.extend_from_slice(&head);
    let wrote = tokio::time::timeout(ctx.config.connect_timeout, net::write_all(&upstream, &told)).await;
    if let Err(e) = wrote.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())) {
        log::warn!(
            "[{name}] {} -> {}: telling it who the client is: {e}",
            close::named(who, Some(&said)),
            state.addr
        );
        owner(route, said).closed(who, &Totals::error(), started.elapsed());
        return None;
    }
    // The handshake's buffers are done with; a connection relayed for days
    // must not keep them.
    drop((told, head, id, tlvs, facts));
    let mut early_upstream = Vec::new();
    let mut sent_to_client = 0;
    if let Some(ws) = &ctx.config.ws {
        match websocket::await_switch(ws, &upstream).await {
            Ok(answer) => early_upstream = answer,
            Err(no) => {
                m.rejected(Reject::upstream_refused_upgrade);
                log::warn!(
                    "[{name}] {} -> {}: WebSocket upgrade not switched: {no}; closing both",
                    close::who(who),
                    state.addr
                );
                websocket::pass_refusal(&client, &no).await;
                state.metrics.active.dec();
                return Some(CloseReason::rejected);
            }
        }
        // MQTT over WebSocket: the client sends its CONNECT only once it
        // has the broker's 101, so the upstream was chosen before it.
        if ctx.config.mqtt.is_some() {
            let limit = ctx.config.connect_timeout;
            let switched = tokio::time::timeout(limit, client.write_all(&early_upstream)).await;
            sent_to_client = std::mem::take(&mut early_upstream).len() as u64;
            let read = match switched {
                Ok(Ok(())) => read_connect(ctx, &mut inbox, Framing::WebSocket, who).await,
                // Gone (or not reading) before its CONNECT could come.
                _ => no_connect(ctx, who, NoConnect::Closed),
            };
            let Some(c) = read else {
                state.metrics.active.dec();
                return Some(CloseReason::rejected);
            };
            said.mqtt = Some(Session::from(&c));
        }
    }
    let keepalive = said.mqtt.as_ref().map_or(0, |s| s.keepalive);
    if keepalive > 0 {
        // MQTT 3.1.2.10: the server may close a client it has not heard
        // from for 1.5 keep-alives. A client that answers TCP probes is
        // alive; one that vanished is closed by the kernel that long after
        // its last packet.
        let k = Duration::from_secs(keepalive.into());
        if let Err(e) = net::dead_peer_limit(client.tcp(), k, k * 3 / 2) {
            log::warn!("[{name}] {}: setting TCP keep-alive: {e}", close::who(who));
        }
    }
    drop(handshake);
    // Client bytes behind the PROXY header and upgrade request: a CONNECT
    // or ClientHello left in place, and whatever followed it.
    let early_client = inbox.into_rest();
    let owner = owner(route, said);
    let early = Early {
        consumed,
        client: early_client,
        upstream: early_upstream,
        sent_to_client,
    };
    let carried = match client {
        Client::Plain(client) => {
            let conn = Carried {
                client,
                upstream,
                who,
                started,
                owner: owner.clone(),
            };
            ctx.datapath.carry(conn, early).await
        }
        Client::Tls(client) => {
            let conn = Carried {
                client: *client,
                upstream,
                who,
                started,
                owner: owner.clone(),
            };
            ctx.datapath.carry_tls(conn, early).await.map(Some)
        }
    };
    let totals = match carried {
        Ok(Some(t)) => t,
        Ok(None) => return None,
        Err(e) => {
            log::warn!("[{name}] {} -> {}: {e:#}", close::who(who), state.addr);
            Totals::error()
        }
    };
    owner.closed(who, &totals, started.elapsed());
    None
}

/// Whether the real client may come in now (allow/deny, then the rate
/// limits); a refused one is counted, logged and, on a WebSocket listener
/// (`client` given), answered.
async fn admit(ctx: &ListenerCtx, who: ClientAddrs, client: Option<&Client>) -> bool {
    let (name, m) = (&ctx.config.name, &ctx.metrics);
    if !ctx.access.permits(who.real.ip()) {
        m.rejected(Reject::access_denied);
        log::warn!("[{name}] {}: access denied (allow/deny)", close::who(who));
        if let Some(c) = client {
            refuse(ctx, c, Refusal::Forbidden).await;
        }
        return false;
    }
    let now = Instant::now();
    if let Err(limited) = ctx.limits.admit(who.real.ip(), now) {
        m.rejected(Reject::rate_limited);
        if let Some(unlogged) = ctx.limited_log.pass(now) {
            let limit = fmt::from_fn(|f| match limited {
                Limited::Source(net) => write!(f, "rate-limit for {net}"),
                Limited::Listener => f.write_str("max-connect-rate"),
            });
            let more = fmt::from_fn(|f| match unlogged {
                0 => Ok(()),
                n => write!(f, " ({n} more since the last such line)"),
            });
            log::warn!("[{name}] {}: over {limit}, closed{more}", close::who(who));
        }
        if let Some(c) = client {
            refuse(ctx, c, Refusal::TooManyRequests).await;
        }
        return false;
    }
    true
}

/// The connection's owner: its route, or on an MQTT or TLS passthrough
/// listener a Named of its own (the route and what the first packet said,
/// for the close line).
fn owner(route: Arc<Route>, said: Said) -> Arc<dyn Owner> {
    match said.is_empty() {
        true => route,
        false => Arc::new(Named { route, said }),
    }
}

/// Reads the client's CONNECT through `inbox`, which keeps its bytes for
/// the broker. None when it was refused: counted, logged and answered.
async fn read_connect(
    ctx: &ListenerCtx,
    inbox: &mut Inbox<'_, Client>,
    framing: Framing,
    who: ClientAddrs,
) -> Option<Connect> {
    let (Some(opts), Some(mm)) = (&ctx.config.mqtt, &ctx.mqtt_metrics) else {
        unreachable!("MQTT listeners have MQTT options and metrics")
    };
    match mqtt::read_connect(opts, inbox, framing).await {
        Ok(c) => {
            mm.connected(c.version);
            Some(c)
        }
        Err(why) => no_connect(ctx, who, why),
    }
}

/// Counts and logs a client refused for its first packet.
fn no_connect<T>(ctx: &ListenerCtx, who: ClientAddrs, why: NoConnect) -> Option<T> {
    ctx.metrics.rejected(Reject::bad_mqtt_connect);
    if let Some(mm) = &ctx.mqtt_metrics {
        mm.refused(why.label());
    }
    log::warn!("[{}] {}: refused: {why}", ctx.config.name, close::who(who));
    None
}

/// A WebSocket client gets an HTTP answer before the close; a TCP client
/// just the close.
async fn refuse(ctx: &ListenerCtx, client: &Client, refusal: Refusal) {
    if ctx.config.ws.is_some() {
        websocket::refuse(client, &refusal).await;
    }
}

/// Tries the balancer's candidates in order, each within connect-timeout.
/// Failures count toward the upstream's `fall` (passive health check),
/// unless they are this node's own (out of fds or memory): those say
/// nothing about the broker, and the client is refused at once.
async fn connect_upstream(
    ctx: &ListenerCtx,
    balancer: &Balancer,
    client: SocketAddr,
    client_id: Option<&str>,
) -> Option<(TcpStream, Arc<UpstreamState>)> {
    let timeout = ctx.config.connect_timeout;
    let name = &ctx.config.name;
    for up in balancer.candidates(client.ip(), client_id) {
        let started = Instant::now();
        let why = match tokio::time::timeout(timeout, TcpStream::connect(up.addr)).await {
            Ok(Ok(s)) => {
                up.metrics.connect.observe(started.elapsed().as_secs_f64());
                up.report(&ctx.config.health, Ok(()));
                return Some((s, up));
            }
            Ok(Err(e)) if is_local_shortage(&e) => {
                log::warn!("[{name}] upstream {}: connect failed here, not at the broker: {e}", up.addr);
                return None;
            }
            Ok(Err(e)) => Failure::Connect(e),
            Err(_) => Failure::ConnectTimeout(timeout),
        };
        log::warn!("[{name}] upstream {}: {why}", up.addr);
        up.metrics.failures.inc();
        up.report(&ctx.config.health, Err(why));
    }
    None
}

/// An error of this node's own making: no fd, no memory, no buffer.
fn is_local_shortage(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS)
    )
}

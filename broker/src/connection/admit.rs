//! Letting a client in: the CONNECT's refusals and terms (decided by
//! `negotiate.rs`), the login (the password file, the anonymous rules or
//! an enhanced authentication exchange), the ACL on the will, the session
//! begun or resumed, the CONNACK; and a re-authentication later on.

use std::sync::Arc;

use ferrymq_codec::{
    Auth, AuthProperties, Connect, MqttString, Packet, Protocol, ReasonCode, ReasonContext,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tracing::warn;

use super::inbound::{acl_denied, too_many_levels};
use super::stream::Io;
use super::{Close, Conn, Extras, ServeOptions};
use crate::Shared;
use crate::acl::ClientAccess;
use crate::auth::{AuthMethod, AuthStep};
use crate::engine::Engine;
use crate::lifecycle::begin_session;
use crate::negotiate;
use crate::rate::PublishRate;
use crate::session::Control;
use crate::shed;
use crate::stats::Stats;
use crate::storage::{self, StoreOp};

impl<'a, S: AsyncRead + AsyncWrite + Unpin + 'static> Conn<'a, S> {
    /// Checks a CONNECT, attaches the session (taking over any connection
    /// holding it), and queues the CONNACK. Returns `None` when the client
    /// was refused (the refusal is sent and the stream closed).
    pub(super) async fn accept(
        connect: Connect,
        mut io: Io<S>,
        shared: &'a Shared,
        options: ServeOptions,
    ) -> Option<Self> {
        let protocol = connect.protocol;
        let config = shared.config();
        let limits = &config.limits;
        let acl_access = access(shared, &connect, &options);
        // Taken before the login: a refused connection leaves a gap in the
        // numbers, which only have to be unique.
        let connection = shared.next_connection();
        let circumstances = negotiate::Circumstances {
            limits,
            max_session_expiry: config.storage.max_session_expiry,
            trusted_clients: &config.ferry.trusted_clients,
            acl_trusted_bridge: acl_access.as_ref().is_some_and(|a| a.trusted_bridge()),
            in_process: options.in_process,
            shedding: shared.shedding.level() >= shed::REFUSE_CONNECTIONS,
            connection,
            boot_id: shared.boot_id,
            message_ids: options.message_ids.then_some(shared.identity.uuid),
        };
        let admitted = admit(
            &connect,
            &mut io,
            shared,
            &options,
            &circumstances,
            acl_access.as_ref(),
        )
        .await;
        let (auth_method, auth_data) = match admitted {
            Ok(authenticated) => authenticated,
            Err(code) => {
                let connack = negotiate::refusing_connack(code);
                io.queue(&Packet::ConnAck(Box::new(connack)), protocol);
                io.flush_and_close().await;
                return None;
            }
        };
        let negotiate::Terms {
            client_id,
            expiry,
            keep_alive,
            trusted,
            mut connack,
            engine: engine_limits,
        } = negotiate::terms(&connect, &circumstances);
        if let Some(method) = &auth_method {
            connack.properties.authentication_method = Some(method.0.clone());
            connack.properties.authentication_data = auth_data;
        }
        let control = Control::new(connection);
        let (state, resumed, ticket) =
            begin_session(shared, &client_id, !connect.clean_start, expiry, &control).await;
        connack.session_present = resumed;
        let mut durable = shared.store.durable();
        // The session record is durable before the client hears it exists.
        let _ = durable.wait_for(|d| d.up_to >= ticket).await;
        io.queue(&Packet::ConnAck(Box::new(connack)), protocol);
        let engine = Engine::new(protocol, state, engine_limits);
        let mut conn = Conn {
            shared,
            io,
            engine,
            control,
            extras: Extras {
                will: connect.will,
                auth_method,
                reauth: None,
                access: acl_access,
                rate: (limits.max_publish_rate > 0 && !options.in_process)
                    .then(|| PublishRate::new(limits.max_publish_rate, Instant::now().into_std())),
            }
            .boxed(),
            keep_alive: crate::keepalive::Watch::new(
                &shared.keep_alive,
                keep_alive,
                Self::may_sleep(shared),
            ),
            routes: None,
            durable,
            parked: None,
            in_process: options.in_process,
            trusted,
            admission: None,
        };
        if resumed && conn.in_process {
            conn.engine
                .resend_inflight(Instant::now(), &mut conn.io.busy().packets);
            // From here on the first phase of its exchanges is kept in
            // memory only (`volatile_inflight`): records of it from before
            // (a run that kept them) go now, not never.
            let number = conn.engine.state.number;
            for (&packet_id, inflight) in &conn.engine.state.inflight {
                if matches!(inflight, crate::session::Inflight::Sent(_)) {
                    conn.io
                        .busy()
                        .ops
                        .push(StoreOp::InflightDelete { number, packet_id });
                }
            }
        } else if resumed && !conn.engine.state.inflight.is_empty() {
            // A ticket taken now is durable only after every write before
            // it, the records of these ids among them.
            let ticket = storage::Batch::new(shared.store.as_ref()).ticket();
            conn.engine.resend_inflight_after(ticket, Instant::now());
        }
        Some(conn)
    }

    /// An AUTH packet after CONNACK: a re-authentication (5.0 4.12.1).
    pub(super) fn reauthenticate(&mut self, auth: Auth) -> Option<Close> {
        let protocol_error =
            |why: &str| Some(Close::Protocol(ReasonCode::PROTOCOL_ERROR, why.into()));
        let Some((name, method)) = self.extras.as_deref().and_then(|e| e.auth_method.clone())
        else {
            // AUTH is only valid after CONNECT named an authentication method.
            return protocol_error("AUTH without an authentication method in CONNECT");
        };
        if auth.properties.authentication_method.as_ref() != Some(&name) {
            return protocol_error("AUTH with another authentication method than CONNECT's");
        }
        let data = auth.properties.authentication_data;
        let step = match auth.reason_code {
            ReasonCode::RE_AUTHENTICATE => {
                let (exchange, step) = method.begin(&self.engine.state.client_id, data);
                self.extras.get_or_insert_default().reauth = Some(exchange);
                step
            }
            ReasonCode::CONTINUE_AUTHENTICATION => {
                match self.extras.as_deref_mut().and_then(|e| e.reauth.as_mut()) {
                    Some(exchange) => exchange.step(data),
                    None => return protocol_error("AUTH Continue without an exchange in progress"),
                }
            }
            _ => return protocol_error("AUTH Success from a client"),
        };
        let reply = |reason_code, data| {
            Packet::Auth(Auth {
                reason_code,
                properties: AuthProperties {
                    authentication_method: Some(name.clone()),
                    authentication_data: data,
                    ..AuthProperties::default()
                },
            })
        };
        match step {
            AuthStep::Continue(data) => {
                let packet = reply(ReasonCode::CONTINUE_AUTHENTICATION, data);
                self.io.busy().packets.push(packet);
            }
            AuthStep::Success(data) => {
                let packet = reply(ReasonCode::SUCCESS, data);
                if let Some(extras) = self.extras.as_deref_mut() {
                    extras.reauth = None;
                }
                self.io.busy().packets.push(packet);
            }
            AuthStep::Failure(code) => {
                let code = if code.is_valid_for(ReasonContext::Disconnect) {
                    code
                } else {
                    ReasonCode::NOT_AUTHORIZED
                };
                return Some(Close::Protocol(code, "re-authentication failed".into()));
            }
        }
        None
    }
}

/// A login that passed with an enhanced authentication method: the
/// method (with its name), and the data of its last step for the CONNACK.
type Authenticated = (
    Option<(MqttString, Arc<dyn AuthMethod>)>,
    Option<bytes::Bytes>,
);

/// Everything that may refuse a CONNECT, in order: the refusals that need
/// no login (`negotiate::refusal`, counted and logged here), the login (an
/// enhanced authentication exchange, or the password file and the
/// anonymous rules), then the ACL on the will topic. `Err` is the reason
/// code to refuse with.
async fn admit<S>(
    connect: &Connect,
    io: &mut Io<S>,
    shared: &Shared,
    options: &ServeOptions,
    circumstances: &negotiate::Circumstances<'_>,
    access: Option<&ClientAccess>,
) -> Result<Authenticated, ReasonCode>
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    if let Some(refusal) = negotiate::refusal(connect, circumstances) {
        match (refusal, &connect.will) {
            (negotiate::Refusal::Shedding, _) => Stats::add(&shared.stats.connections_shed, 1),
            (negotiate::Refusal::WillTooDeep, Some(will)) => {
                too_many_levels(shared, &connect.client_id, "will topic", &will.topic);
            }
            _ => {}
        }
        return Err(refusal.code(connect.protocol));
    }
    let mut authenticated = (None, None);
    if let (Protocol::V5, Some(name)) =
        (connect.protocol, &connect.properties.authentication_method)
    {
        let Some(method) = shared
            .auth_methods
            .iter()
            .find(|m| m.name() == name.as_str())
        else {
            return Err(ReasonCode::BAD_AUTHENTICATION_METHOD);
        };
        let data = connect.properties.authentication_data.clone();
        match authenticate(io, shared, method.as_ref(), name, &connect.client_id, data).await {
            Ok(AuthStep::Success(data)) => {
                authenticated = (Some((name.clone(), method.clone())), data);
            }
            Ok(AuthStep::Failure(code)) => return Err(code),
            Ok(AuthStep::Continue(_)) | Err(_) => return Err(ReasonCode::NOT_AUTHORIZED),
        }
    } else if let Some(code) = log_in(shared, connect, options).await {
        return Err(code);
    }
    if let Some(will) = &connect.will
        && access.is_some_and(|a| !a.may_publish(&will.topic))
    {
        acl_denied(shared, &connect.client_id, "will", &will.topic);
        return Err(ReasonCode::NOT_AUTHORIZED);
    }
    Ok(authenticated)
}

/// Runs an enhanced authentication exchange during CONNECT: relays
/// Authentication Data between the client (AUTH packets) and `method`
/// until it answers success or failure. Bounded by `connect_timeout_secs`
/// as a whole.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin + 'static>(
    io: &mut Io<S>,
    shared: &Shared,
    method: &dyn AuthMethod,
    name: &MqttString,
    client_id: &MqttString,
    data: Option<bytes::Bytes>,
) -> Result<AuthStep, String> {
    let (mut exchange, mut step) = method.begin(client_id, data);
    let max = shared.config().limits.max_packet_size;
    let timeout = shared.config().limits.connect_timeout;
    tokio::time::timeout(timeout, async {
        loop {
            let AuthStep::Continue(data) = step else {
                return Ok(step);
            };
            let challenge = Auth {
                reason_code: ReasonCode::CONTINUE_AUTHENTICATION,
                properties: AuthProperties {
                    authentication_method: Some(name.clone()),
                    authentication_data: data,
                    ..AuthProperties::default()
                },
            };
            io.queue(&Packet::Auth(challenge), Protocol::V5);
            let out = std::mem::take(&mut io.busy().out);
            io.stream.write_all(&out).await.map_err(|e| e.to_string())?;
            match io.read_packet(Protocol::V5, max).await? {
                Packet::Auth(answer)
                    if answer.reason_code == ReasonCode::CONTINUE_AUTHENTICATION
                        && answer.properties.authentication_method.as_ref() == Some(name) =>
                {
                    step = exchange.step(answer.properties.authentication_data);
                }
                other => return Err(format!("expected AUTH, got {}", other.packet_type())),
            }
        }
    })
    .await
    .map_err(|_| "authentication timed out".to_string())?
}

/// Checks who the client is (when no enhanced authentication method
/// did): a user name must come with its password when `[auth]
/// password_file` is set; without one (or without a password file) the
/// client is anonymous, allowed with `allow_anonymous` from loopback (or
/// in-process clients are always let in), and from anywhere only with
/// `allow_anonymous_remote`.
/// `Some` is the refusal: 0x86 Bad User Name or Password (3.1.1: 4) for
/// failed credentials, 0x87 Not authorized (3.1.1: 5) for an anonymous
/// client that may not connect.
async fn log_in(shared: &Shared, connect: &Connect, options: &ServeOptions) -> Option<ReasonCode> {
    let auth = &shared.config().auth;
    // In-process clients are the embedding program itself.
    let ip = options.peer?;
    if options.identity_is_user && options.identity.is_some() {
        // Its certificate, verified in the TLS handshake, says who it is.
        return None;
    }
    if let (Some(users), Some(name)) = (&shared.users, &connect.username) {
        let password = connect.password.as_deref().unwrap_or_default();
        return match users.login(Some(ip), name, password).await {
            crate::users::Login::Verified | crate::users::Login::Remembered => None,
            crate::users::Login::Refused => {
                Stats::add(&shared.stats.auth_failures, 1);
                if shared.auth_log.allow() {
                    warn!(%ip, user = %name, "login refused: unknown user or wrong password");
                }
                Some(ReasonCode::BAD_USER_NAME_OR_PASSWORD)
            }
        };
    }
    let local = ip.to_canonical().is_loopback();
    let anonymous_ok = auth.allow_anonymous && (local || auth.allow_anonymous_remote);
    (!anonymous_ok).then_some(ReasonCode::NOT_AUTHORIZED)
}

/// What the ACL lets a client that passed `log_in` do: `None` without an
/// `acl_file`, and for in-process clients (the embedding program). Its
/// user name counts only when a password file verified it.
fn access(shared: &Shared, connect: &Connect, options: &ServeOptions) -> Option<ClientAccess> {
    let acl = shared.acl.as_ref().filter(|_| !options.in_process)?;
    let identity = options.identity.as_deref();
    let user = match (options.identity_is_user, identity) {
        (true, Some(identity)) => Some(identity),
        _ => shared.users.as_ref().and(connect.username.as_deref()),
    };
    Some(ClientAccess::new(acl, user, &connect.client_id, identity))
}

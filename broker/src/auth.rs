//! MQTT 5.0 enhanced authentication (AUTH, spec 4.12): the plumbing that
//! lets an authentication method be added without touching the protocol
//! code. A method is registered with [`crate::BrokerBuilder::auth_method`];
//! a client names it in CONNECT's Authentication Method, and the broker
//! relays Authentication Data between the client and the method's
//! [`AuthExchange`] (AUTH packets with Continue authentication) until the
//! method answers success or failure. The same runs again when the client
//! asks to re-authenticate. A method the broker does not have is refused
//! with 0x8C (Bad authentication method).

use bytes::Bytes;
use ferrymq_codec::ReasonCode;

/// What an authentication method says after each step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthStep {
    /// Send this data to the client (AUTH 0x18) and wait for its answer.
    Continue(Option<Bytes>),
    /// Authenticated; the data (if any) goes to the client with the
    /// CONNACK (or the AUTH 0x00 of a re-authentication).
    Success(Option<Bytes>),
    /// Refused with this reason code (e.g. 0x87 Not authorized).
    Failure(ReasonCode),
}

/// An enhanced authentication method (e.g. SCRAM-SHA-256).
pub trait AuthMethod: Send + Sync + 'static {
    /// Its name, as clients write it in the Authentication Method property.
    fn name(&self) -> &str;

    /// Starts an exchange for `client_id` with the client's initial
    /// Authentication Data.
    fn begin(&self, client_id: &str, data: Option<Bytes>) -> (Box<dyn AuthExchange>, AuthStep);
}

/// One client's authentication exchange in progress.
pub trait AuthExchange: Send {
    /// The client's next Authentication Data.
    fn step(&mut self, data: Option<Bytes>) -> AuthStep;
}

//! MQTT 5.0 properties (spec 2.2.2): one typed struct per packet, so a
//! property that a packet cannot carry cannot be built for it either.
//!
//! Decoding reads each property generically ([`read_property`], which also
//! applies the value rules that hold everywhere, such as Receive Maximum
//! not 0), then the packet's set accepts it or answers
//! [`DecodeError::PropertyNotAllowed`] / [`DecodeError::DuplicateProperty`].
//! Encoding walks the set once to size it and once to write it.

use bytes::{BufMut, Bytes};

use crate::error::{DecodeError, EncodeError};
use crate::packet::QoS;
use crate::string::MqttString;
use crate::topic;
use crate::wire::{self, MAX_VARINT, Reader};

/// A property identifier (spec table 2-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[allow(missing_docs)]
pub enum PropertyId {
    PayloadFormatIndicator = 0x01,
    MessageExpiryInterval = 0x02,
    ContentType = 0x03,
    ResponseTopic = 0x08,
    CorrelationData = 0x09,
    SubscriptionIdentifier = 0x0B,
    SessionExpiryInterval = 0x11,
    AssignedClientIdentifier = 0x12,
    ServerKeepAlive = 0x13,
    AuthenticationMethod = 0x15,
    AuthenticationData = 0x16,
    RequestProblemInformation = 0x17,
    WillDelayInterval = 0x18,
    RequestResponseInformation = 0x19,
    ResponseInformation = 0x1A,
    ServerReference = 0x1C,
    ReasonString = 0x1F,
    ReceiveMaximum = 0x21,
    TopicAliasMaximum = 0x22,
    TopicAlias = 0x23,
    MaximumQos = 0x24,
    RetainAvailable = 0x25,
    UserProperty = 0x26,
    MaximumPacketSize = 0x27,
    WildcardSubscriptionAvailable = 0x28,
    SubscriptionIdentifierAvailable = 0x29,
    SharedSubscriptionAvailable = 0x2A,
}

/// Payload Format Indicator values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PayloadFormat {
    /// 0: unspecified bytes.
    Unspecified,
    /// 1: UTF-8 encoded character data.
    Utf8,
}

/// One user property: a name and a value, both strings. Order and
/// repetition are significant and preserved.
pub type UserProperty = (MqttString, MqttString);

/// One decoded property with its typed value.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::enum_variant_names)] // The variants are the spec's names.
pub(crate) enum Property {
    PayloadFormatIndicator(PayloadFormat),
    MessageExpiryInterval(u32),
    ContentType(MqttString),
    ResponseTopic(MqttString),
    CorrelationData(Bytes),
    SubscriptionIdentifier(u32),
    SessionExpiryInterval(u32),
    AssignedClientIdentifier(MqttString),
    ServerKeepAlive(u16),
    AuthenticationMethod(MqttString),
    AuthenticationData(Bytes),
    RequestProblemInformation(bool),
    WillDelayInterval(u32),
    RequestResponseInformation(bool),
    ResponseInformation(MqttString),
    ServerReference(MqttString),
    ReasonString(MqttString),
    ReceiveMaximum(u16),
    TopicAliasMaximum(u16),
    TopicAlias(u16),
    MaximumQos(QoS),
    RetainAvailable(bool),
    UserProperty(MqttString, MqttString),
    MaximumPacketSize(u32),
    WildcardSubscriptionAvailable(bool),
    SubscriptionIdentifierAvailable(bool),
    SharedSubscriptionAvailable(bool),
}

impl Property {
    fn id(&self) -> PropertyId {
        use Property as P;
        use PropertyId as I;
        match self {
            P::PayloadFormatIndicator(_) => I::PayloadFormatIndicator,
            P::MessageExpiryInterval(_) => I::MessageExpiryInterval,
            P::ContentType(_) => I::ContentType,
            P::ResponseTopic(_) => I::ResponseTopic,
            P::CorrelationData(_) => I::CorrelationData,
            P::SubscriptionIdentifier(_) => I::SubscriptionIdentifier,
            P::SessionExpiryInterval(_) => I::SessionExpiryInterval,
            P::AssignedClientIdentifier(_) => I::AssignedClientIdentifier,
            P::ServerKeepAlive(_) => I::ServerKeepAlive,
            P::AuthenticationMethod(_) => I::AuthenticationMethod,
            P::AuthenticationData(_) => I::AuthenticationData,
            P::RequestProblemInformation(_) => I::RequestProblemInformation,
            P::WillDelayInterval(_) => I::WillDelayInterval,
            P::RequestResponseInformation(_) => I::RequestResponseInformation,
            P::ResponseInformation(_) => I::ResponseInformation,
            P::ServerReference(_) => I::ServerReference,
            P::ReasonString(_) => I::ReasonString,
            P::ReceiveMaximum(_) => I::ReceiveMaximum,
            P::TopicAliasMaximum(_) => I::TopicAliasMaximum,
            P::TopicAlias(_) => I::TopicAlias,
            P::MaximumQos(_) => I::MaximumQos,
            P::RetainAvailable(_) => I::RetainAvailable,
            P::UserProperty(..) => I::UserProperty,
            P::MaximumPacketSize(_) => I::MaximumPacketSize,
            P::WildcardSubscriptionAvailable(_) => I::WildcardSubscriptionAvailable,
            P::SubscriptionIdentifierAvailable(_) => I::SubscriptionIdentifierAvailable,
            P::SharedSubscriptionAvailable(_) => I::SharedSubscriptionAvailable,
        }
    }
}

fn invalid(property: PropertyId, value: u32) -> DecodeError {
    DecodeError::InvalidPropertyValue { property, value }
}

fn flag(reader: &mut Reader, id: PropertyId) -> Result<bool, DecodeError> {
    match reader.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(invalid(id, u32::from(other))),
    }
}

fn non_zero_u16(reader: &mut Reader, id: PropertyId) -> Result<u16, DecodeError> {
    match reader.u16()? {
        0 => Err(invalid(id, 0)),
        v => Ok(v),
    }
}

/// Reads one property: identifier, then its value, checked against the
/// rules that hold in every packet.
pub(crate) fn read_property(reader: &mut Reader) -> Result<Property, DecodeError> {
    use Property as P;
    use PropertyId as I;
    // The identifier is a variable byte integer; every defined one is
    // below 128, a single byte.
    Ok(match reader.varint()? {
        0x01 => P::PayloadFormatIndicator(match reader.u8()? {
            0 => PayloadFormat::Unspecified,
            1 => PayloadFormat::Utf8,
            v => return Err(invalid(I::PayloadFormatIndicator, u32::from(v))),
        }),
        0x02 => P::MessageExpiryInterval(reader.u32()?),
        0x03 => P::ContentType(reader.string()?),
        0x08 => {
            let t = reader.string()?;
            topic::validate_topic_name(&t).map_err(DecodeError::InvalidTopicName)?;
            P::ResponseTopic(t)
        }
        0x09 => P::CorrelationData(reader.binary()?),
        0x0B => match reader.varint()? {
            0 => return Err(invalid(I::SubscriptionIdentifier, 0)),
            v => P::SubscriptionIdentifier(v),
        },
        0x11 => P::SessionExpiryInterval(reader.u32()?),
        0x12 => P::AssignedClientIdentifier(reader.string()?),
        0x13 => P::ServerKeepAlive(reader.u16()?),
        0x15 => P::AuthenticationMethod(reader.string()?),
        0x16 => P::AuthenticationData(reader.binary()?),
        0x17 => P::RequestProblemInformation(flag(reader, I::RequestProblemInformation)?),
        0x18 => P::WillDelayInterval(reader.u32()?),
        0x19 => P::RequestResponseInformation(flag(reader, I::RequestResponseInformation)?),
        0x1A => P::ResponseInformation(reader.string()?),
        0x1C => P::ServerReference(reader.string()?),
        0x1F => P::ReasonString(reader.string()?),
        0x21 => P::ReceiveMaximum(non_zero_u16(reader, I::ReceiveMaximum)?),
        0x22 => P::TopicAliasMaximum(reader.u16()?),
        0x23 => P::TopicAlias(non_zero_u16(reader, I::TopicAlias)?),
        0x24 => P::MaximumQos(match reader.u8()? {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            v => return Err(invalid(I::MaximumQos, u32::from(v))),
        }),
        0x25 => P::RetainAvailable(flag(reader, I::RetainAvailable)?),
        0x26 => {
            let name = reader.string()?;
            let value = reader.string()?;
            P::UserProperty(name, value)
        }
        0x27 => match reader.u32()? {
            0 => return Err(invalid(I::MaximumPacketSize, 0)),
            v => P::MaximumPacketSize(v),
        },
        0x28 => P::WildcardSubscriptionAvailable(flag(reader, I::WildcardSubscriptionAvailable)?),
        0x29 => {
            P::SubscriptionIdentifierAvailable(flag(reader, I::SubscriptionIdentifierAvailable)?)
        }
        0x2A => P::SharedSubscriptionAvailable(flag(reader, I::SharedSubscriptionAvailable)?),
        other => return Err(DecodeError::UnknownProperty(other)),
    })
}

/// Where a property set's values go when encoding: a [`Sizer`] that counts
/// and checks, or a [`Writer`] that writes.
pub(crate) trait PropertySink {
    fn byte(&mut self, id: PropertyId, value: u8);
    fn two(&mut self, id: PropertyId, value: u16);
    fn four(&mut self, id: PropertyId, value: u32);
    fn varint(&mut self, id: PropertyId, value: u32);
    fn string(&mut self, id: PropertyId, value: &str);
    fn binary(&mut self, id: PropertyId, value: &[u8]);
    fn pair(&mut self, name: &str, value: &str);

    fn flag(&mut self, id: PropertyId, value: bool) {
        self.byte(id, u8::from(value));
    }
}

/// Counts the encoded length and remembers the first value that cannot be
/// encoded.
#[derive(Default)]
pub(crate) struct Sizer {
    len: usize,
    error: Option<EncodeError>,
}

impl Sizer {
    fn fail(&mut self, error: EncodeError) {
        self.error.get_or_insert(error);
    }
}

impl PropertySink for Sizer {
    fn byte(&mut self, _: PropertyId, _: u8) {
        self.len += 2;
    }
    fn two(&mut self, _: PropertyId, _: u16) {
        self.len += 3;
    }
    fn four(&mut self, _: PropertyId, _: u32) {
        self.len += 5;
    }
    fn varint(&mut self, id: PropertyId, value: u32) {
        if value == 0 || value > MAX_VARINT {
            self.fail(EncodeError::InvalidPropertyValue {
                property: id,
                value,
            });
        }
        self.len += 1 + wire::varint_len(value as usize);
    }
    fn string(&mut self, _: PropertyId, value: &str) {
        self.len += 3 + value.len();
    }
    fn binary(&mut self, _: PropertyId, value: &[u8]) {
        if let Err(e) = wire::check_binary(value) {
            self.fail(e);
        }
        self.len += 3 + value.len();
    }
    fn pair(&mut self, name: &str, value: &str) {
        self.len += 5 + name.len() + value.len();
    }
}

/// Writes properties into a buffer.
pub(crate) struct Writer<'a, B: BufMut>(pub(crate) &'a mut B);

impl<B: BufMut> PropertySink for Writer<'_, B> {
    fn byte(&mut self, id: PropertyId, value: u8) {
        self.0.put_u8(id as u8);
        self.0.put_u8(value);
    }
    fn two(&mut self, id: PropertyId, value: u16) {
        self.0.put_u8(id as u8);
        self.0.put_u16(value);
    }
    fn four(&mut self, id: PropertyId, value: u32) {
        self.0.put_u8(id as u8);
        self.0.put_u32(value);
    }
    fn varint(&mut self, id: PropertyId, value: u32) {
        self.0.put_u8(id as u8);
        wire::put_varint(self.0, value as usize);
    }
    fn string(&mut self, id: PropertyId, value: &str) {
        self.0.put_u8(id as u8);
        wire::put_string(self.0, value);
    }
    fn binary(&mut self, id: PropertyId, value: &[u8]) {
        self.0.put_u8(id as u8);
        wire::put_binary(self.0, value);
    }
    fn pair(&mut self, name: &str, value: &str) {
        self.0.put_u8(PropertyId::UserProperty as u8);
        wire::put_string(self.0, name);
        wire::put_string(self.0, value);
    }
}

/// The properties of one packet kind.
pub(crate) trait PropertySet: Default {
    /// Where these properties live, for error messages.
    const WHERE: &'static str;
    /// Takes one decoded property, or refuses it.
    fn apply(&mut self, property: Property) -> Result<(), DecodeError>;
    /// Emits every property present, in identifier order.
    fn emit(&self, sink: &mut impl PropertySink);
}

/// Reads a property length and the properties it covers.
pub(crate) fn decode<P: PropertySet>(reader: &mut Reader) -> Result<P, DecodeError> {
    let len = reader.varint()? as usize;
    let mut inner = reader.sub_reader(len)?;
    let mut set = P::default();
    while !inner.is_empty() {
        set.apply(read_property(&mut inner)?)?;
    }
    Ok(set)
}

/// The encoded length of a property set, without its length prefix.
pub(crate) fn encoded_len<P: PropertySet>(set: &P) -> Result<usize, EncodeError> {
    let mut sizer = Sizer::default();
    set.emit(&mut sizer);
    match sizer.error {
        Some(e) => Err(e),
        None => Ok(sizer.len),
    }
}

/// Writes the length prefix and the properties; `len` from [`encoded_len`].
pub(crate) fn encode<P: PropertySet>(set: &P, len: usize, buf: &mut impl BufMut) {
    wire::put_varint(buf, len);
    set.emit(&mut Writer(buf));
}

/// Length prefix plus properties.
pub(crate) fn block_len(len: usize) -> usize {
    wire::varint_len(len) + len
}

fn once<T>(slot: &mut Option<T>, value: T, id: PropertyId) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::DuplicateProperty(id));
    }
    *slot = Some(value);
    Ok(())
}

fn not_allowed(property: &Property, place: &'static str) -> DecodeError {
    DecodeError::PropertyNotAllowed {
        property: property.id(),
        packet: place,
    }
}

fn emit_opt_string(sink: &mut impl PropertySink, id: PropertyId, value: &Option<MqttString>) {
    if let Some(v) = value {
        sink.string(id, v);
    }
}

fn emit_opt_binary(sink: &mut impl PropertySink, id: PropertyId, value: &Option<Bytes>) {
    if let Some(v) = value {
        sink.binary(id, v);
    }
}

fn emit_user(sink: &mut impl PropertySink, user: &[UserProperty]) {
    for (name, value) in user {
        sink.pair(name, value);
    }
}

fn emit_format(sink: &mut impl PropertySink, format: Option<PayloadFormat>) {
    if let Some(f) = format {
        sink.byte(
            PropertyId::PayloadFormatIndicator,
            match f {
                PayloadFormat::Unspecified => 0,
                PayloadFormat::Utf8 => 1,
            },
        );
    }
}

/// Generates a property struct: its fields, `apply` and `emit`.
/// Field kinds: `once` (an `Option`, at most one occurrence) and `user`
/// (the ordered user properties).
macro_rules! property_set {
    (
        $(#[$meta:meta])*
        $name:ident, $where:literal {
            $($(#[$fmeta:meta])* $field:ident : $ty:ty = $variant:ident => |$s:ident, $v:ident| $emit:expr;)*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: Option<$ty>,)*
            /// User Property (0x26), in order.
            pub user_properties: Vec<UserProperty>,
        }

        impl PropertySet for $name {
            const WHERE: &'static str = $where;

            fn apply(&mut self, property: Property) -> Result<(), DecodeError> {
                match property {
                    $(Property::$variant(v) => once(&mut self.$field, v, PropertyId::$variant),)*
                    Property::UserProperty(name, value) => {
                        self.user_properties.push((name, value));
                        Ok(())
                    }
                    other => Err(not_allowed(&other, $where)),
                }
            }

            fn emit(&self, sink: &mut impl PropertySink) {
                $(if let Some($v) = &self.$field { let $s = &mut *sink; $emit; })*
                emit_user(sink, &self.user_properties);
            }
        }

        impl $name {
            /// True when no property is set.
            pub fn is_empty(&self) -> bool {
                $(self.$field.is_none() &&)* self.user_properties.is_empty()
            }
        }
    };
}

property_set! {
    /// Properties of CONNECT (spec 3.1.2.11).
    ConnectProperties, "CONNECT" {
        /// Session Expiry Interval (0x11), seconds.
        session_expiry_interval: u32 = SessionExpiryInterval => |s, v| s.four(PropertyId::SessionExpiryInterval, *v);
        /// Authentication Method (0x15).
        authentication_method: MqttString = AuthenticationMethod => |s, v| s.string(PropertyId::AuthenticationMethod, v);
        /// Authentication Data (0x16).
        authentication_data: Bytes = AuthenticationData => |s, v| s.binary(PropertyId::AuthenticationData, v);
        /// Request Problem Information (0x17).
        request_problem_information: bool = RequestProblemInformation => |s, v| s.flag(PropertyId::RequestProblemInformation, *v);
        /// Request Response Information (0x19).
        request_response_information: bool = RequestResponseInformation => |s, v| s.flag(PropertyId::RequestResponseInformation, *v);
        /// Receive Maximum (0x21), never 0.
        receive_maximum: u16 = ReceiveMaximum => |s, v| s.two(PropertyId::ReceiveMaximum, *v);
        /// Topic Alias Maximum (0x22).
        topic_alias_maximum: u16 = TopicAliasMaximum => |s, v| s.two(PropertyId::TopicAliasMaximum, *v);
        /// Maximum Packet Size (0x27), never 0.
        maximum_packet_size: u32 = MaximumPacketSize => |s, v| s.four(PropertyId::MaximumPacketSize, *v);
    }
}

property_set! {
    /// Properties of the will in CONNECT (spec 3.1.3.2).
    WillProperties, "will properties" {
        /// Payload Format Indicator (0x01).
        payload_format_indicator: PayloadFormat = PayloadFormatIndicator => |s, v| emit_format(s, Some(*v));
        /// Message Expiry Interval (0x02), seconds.
        message_expiry_interval: u32 = MessageExpiryInterval => |s, v| s.four(PropertyId::MessageExpiryInterval, *v);
        /// Content Type (0x03).
        content_type: MqttString = ContentType => |s, v| s.string(PropertyId::ContentType, v);
        /// Response Topic (0x08), a topic name.
        response_topic: MqttString = ResponseTopic => |s, v| s.string(PropertyId::ResponseTopic, v);
        /// Correlation Data (0x09).
        correlation_data: Bytes = CorrelationData => |s, v| s.binary(PropertyId::CorrelationData, v);
        /// Will Delay Interval (0x18), seconds.
        will_delay_interval: u32 = WillDelayInterval => |s, v| s.four(PropertyId::WillDelayInterval, *v);
    }
}

property_set! {
    /// Properties of CONNACK (spec 3.2.2.3).
    ConnAckProperties, "CONNACK" {
        /// Session Expiry Interval (0x11), seconds.
        session_expiry_interval: u32 = SessionExpiryInterval => |s, v| s.four(PropertyId::SessionExpiryInterval, *v);
        /// Assigned Client Identifier (0x12).
        assigned_client_identifier: MqttString = AssignedClientIdentifier => |s, v| s.string(PropertyId::AssignedClientIdentifier, v);
        /// Server Keep Alive (0x13), seconds.
        server_keep_alive: u16 = ServerKeepAlive => |s, v| s.two(PropertyId::ServerKeepAlive, *v);
        /// Authentication Method (0x15).
        authentication_method: MqttString = AuthenticationMethod => |s, v| s.string(PropertyId::AuthenticationMethod, v);
        /// Authentication Data (0x16).
        authentication_data: Bytes = AuthenticationData => |s, v| s.binary(PropertyId::AuthenticationData, v);
        /// Response Information (0x1A).
        response_information: MqttString = ResponseInformation => |s, v| s.string(PropertyId::ResponseInformation, v);
        /// Server Reference (0x1C).
        server_reference: MqttString = ServerReference => |s, v| s.string(PropertyId::ServerReference, v);
        /// Reason String (0x1F).
        reason_string: MqttString = ReasonString => |s, v| s.string(PropertyId::ReasonString, v);
        /// Receive Maximum (0x21), never 0.
        receive_maximum: u16 = ReceiveMaximum => |s, v| s.two(PropertyId::ReceiveMaximum, *v);
        /// Topic Alias Maximum (0x22).
        topic_alias_maximum: u16 = TopicAliasMaximum => |s, v| s.two(PropertyId::TopicAliasMaximum, *v);
        /// Maximum QoS (0x24): 0 or 1 (absent means 2).
        maximum_qos: QoS = MaximumQos => |s, v| s.byte(PropertyId::MaximumQos, *v as u8);
        /// Retain Available (0x25).
        retain_available: bool = RetainAvailable => |s, v| s.flag(PropertyId::RetainAvailable, *v);
        /// Maximum Packet Size (0x27), never 0.
        maximum_packet_size: u32 = MaximumPacketSize => |s, v| s.four(PropertyId::MaximumPacketSize, *v);
        /// Wildcard Subscription Available (0x28).
        wildcard_subscription_available: bool = WildcardSubscriptionAvailable => |s, v| s.flag(PropertyId::WildcardSubscriptionAvailable, *v);
        /// Subscription Identifier Available (0x29).
        subscription_identifier_available: bool = SubscriptionIdentifierAvailable => |s, v| s.flag(PropertyId::SubscriptionIdentifierAvailable, *v);
        /// Shared Subscription Available (0x2A).
        shared_subscription_available: bool = SharedSubscriptionAvailable => |s, v| s.flag(PropertyId::SharedSubscriptionAvailable, *v);
    }
}

property_set! {
    /// Properties of PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and UNSUBACK.
    AckProperties, "acknowledgement" {
        /// Reason String (0x1F).
        reason_string: MqttString = ReasonString => |s, v| s.string(PropertyId::ReasonString, v);
    }
}

property_set! {
    /// Properties of UNSUBSCRIBE (spec 3.10.2.1): user properties only.
    UnsubscribeProperties, "UNSUBSCRIBE" {}
}

property_set! {
    /// Properties of DISCONNECT (spec 3.14.2.2).
    DisconnectProperties, "DISCONNECT" {
        /// Session Expiry Interval (0x11), seconds.
        session_expiry_interval: u32 = SessionExpiryInterval => |s, v| s.four(PropertyId::SessionExpiryInterval, *v);
        /// Server Reference (0x1C).
        server_reference: MqttString = ServerReference => |s, v| s.string(PropertyId::ServerReference, v);
        /// Reason String (0x1F).
        reason_string: MqttString = ReasonString => |s, v| s.string(PropertyId::ReasonString, v);
    }
}

property_set! {
    /// Properties of AUTH (spec 3.15.2.2).
    AuthProperties, "AUTH" {
        /// Authentication Method (0x15).
        authentication_method: MqttString = AuthenticationMethod => |s, v| s.string(PropertyId::AuthenticationMethod, v);
        /// Authentication Data (0x16).
        authentication_data: Bytes = AuthenticationData => |s, v| s.binary(PropertyId::AuthenticationData, v);
        /// Reason String (0x1F).
        reason_string: MqttString = ReasonString => |s, v| s.string(PropertyId::ReasonString, v);
    }
}

/// Properties of SUBSCRIBE (spec 3.8.2.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscribeProperties {
    /// Subscription Identifier (0x0B), 1 ..= 268,435,455.
    pub subscription_identifier: Option<u32>,
    /// User Property (0x26), in order.
    pub user_properties: Vec<UserProperty>,
}

impl PropertySet for SubscribeProperties {
    const WHERE: &'static str = "SUBSCRIBE";

    fn apply(&mut self, property: Property) -> Result<(), DecodeError> {
        match property {
            Property::SubscriptionIdentifier(v) => once(
                &mut self.subscription_identifier,
                v,
                PropertyId::SubscriptionIdentifier,
            ),
            Property::UserProperty(name, value) => {
                self.user_properties.push((name, value));
                Ok(())
            }
            other => Err(not_allowed(&other, Self::WHERE)),
        }
    }

    fn emit(&self, sink: &mut impl PropertySink) {
        if let Some(id) = self.subscription_identifier {
            sink.varint(PropertyId::SubscriptionIdentifier, id);
        }
        emit_user(sink, &self.user_properties);
    }
}

/// Properties of PUBLISH (spec 3.3.2.3). Subscription Identifier may
/// repeat here: the server sends one per matching subscription.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishProperties {
    /// Payload Format Indicator (0x01).
    pub payload_format_indicator: Option<PayloadFormat>,
    /// Message Expiry Interval (0x02), seconds.
    pub message_expiry_interval: Option<u32>,
    /// Content Type (0x03).
    pub content_type: Option<MqttString>,
    /// Response Topic (0x08), a topic name.
    pub response_topic: Option<MqttString>,
    /// Correlation Data (0x09).
    pub correlation_data: Option<Bytes>,
    /// Subscription Identifier (0x0B), each 1 ..= 268,435,455.
    pub subscription_identifiers: Vec<u32>,
    /// Topic Alias (0x23), never 0.
    pub topic_alias: Option<u16>,
    /// User Property (0x26), in order.
    pub user_properties: Vec<UserProperty>,
}

impl PublishProperties {
    /// True when no property is set.
    pub fn is_empty(&self) -> bool {
        self.payload_format_indicator.is_none()
            && self.message_expiry_interval.is_none()
            && self.content_type.is_none()
            && self.response_topic.is_none()
            && self.correlation_data.is_none()
            && self.subscription_identifiers.is_empty()
            && self.topic_alias.is_none()
            && self.user_properties.is_empty()
    }
}

impl PublishProperties {
    /// Appends the properties as an MQTT 5.0 property block (length
    /// prefix included), as PUBLISH carries them: a stable format for
    /// storing messages.
    pub fn encode_block(&self, buf: &mut bytes::BytesMut) -> Result<(), EncodeError> {
        check_response_topic(&self.response_topic)?;
        let len = encoded_len(self)?;
        encode(self, len, buf);
        Ok(())
    }

    /// Reads a property block written by [`PublishProperties::encode_block`]
    /// from the front of `bytes` (strings and binary data share its
    /// buffer). Returns the properties and the bytes consumed.
    pub fn decode_block(bytes: &Bytes) -> Result<(PublishProperties, usize), DecodeError> {
        let mut reader = Reader::new(bytes, Some(bytes), crate::packet::PacketType::Publish);
        let properties = decode(&mut reader)?;
        Ok((properties, bytes.len() - reader.remaining()))
    }
}

impl PropertySet for PublishProperties {
    const WHERE: &'static str = "PUBLISH";

    fn apply(&mut self, property: Property) -> Result<(), DecodeError> {
        use PropertyId as I;
        match property {
            Property::PayloadFormatIndicator(v) => once(
                &mut self.payload_format_indicator,
                v,
                I::PayloadFormatIndicator,
            ),
            Property::MessageExpiryInterval(v) => once(
                &mut self.message_expiry_interval,
                v,
                I::MessageExpiryInterval,
            ),
            Property::ContentType(v) => once(&mut self.content_type, v, I::ContentType),
            Property::ResponseTopic(v) => once(&mut self.response_topic, v, I::ResponseTopic),
            Property::CorrelationData(v) => once(&mut self.correlation_data, v, I::CorrelationData),
            Property::SubscriptionIdentifier(v) => {
                self.subscription_identifiers.push(v);
                Ok(())
            }
            Property::TopicAlias(v) => once(&mut self.topic_alias, v, I::TopicAlias),
            Property::UserProperty(name, value) => {
                self.user_properties.push((name, value));
                Ok(())
            }
            other => Err(not_allowed(&other, Self::WHERE)),
        }
    }

    fn emit(&self, sink: &mut impl PropertySink) {
        emit_format(sink, self.payload_format_indicator);
        if let Some(v) = self.message_expiry_interval {
            sink.four(PropertyId::MessageExpiryInterval, v);
        }
        emit_opt_string(sink, PropertyId::ContentType, &self.content_type);
        emit_opt_string(sink, PropertyId::ResponseTopic, &self.response_topic);
        emit_opt_binary(sink, PropertyId::CorrelationData, &self.correlation_data);
        for id in &self.subscription_identifiers {
            sink.varint(PropertyId::SubscriptionIdentifier, *id);
        }
        if let Some(v) = self.topic_alias {
            sink.two(PropertyId::TopicAlias, v);
        }
        emit_user(sink, &self.user_properties);
    }
}

/// Checks a Response Topic before encoding (it must be a topic name).
pub(crate) fn check_response_topic(topic: &Option<MqttString>) -> Result<(), EncodeError> {
    match topic {
        Some(t) => topic::validate_topic_name(t).map_err(EncodeError::InvalidTopic),
        None => Ok(()),
    }
}

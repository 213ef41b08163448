//! What the store's tests share: options, messages, ops, and waiting
//! for a ticket.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferrymq_codec::{MqttString, PublishProperties, QoS};
use ferrymq_config::Durability;

use super::RocksOptions;
use super::RocksStore;
use crate::message::{Message, SessionId};
use crate::storage::{Durable, SessionRecord, Store, StoreOp, Ticket};

pub(super) fn options(durability: Durability) -> RocksOptions {
    RocksOptions {
        durability,
        sync_interval: Duration::from_millis(10),
        max_disk_bytes: 1 << 40,
        bridge_reserve_percent: 20,
    }
}

pub(super) fn message(n: u64) -> Arc<Message> {
    Arc::new(Message {
        topic: MqttString::from_static("q"),
        payload: Bytes::from(n.to_string()),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: PublishProperties::default(),
        origin: SessionId(1),
        expires_at: None,
        holders: Default::default(),
    })
}

/// Writes `ops` and waits until they are durable.
pub(super) fn write_sync(store: &RocksStore, ops: Vec<StoreOp>) -> Ticket {
    let ticket = store.begin();
    store.submit(ticket, ops);
    outcome(store, ticket);
    ticket
}

pub(super) fn session(number: u64) -> StoreOp {
    StoreOp::SessionPut(SessionRecord {
        client_id: MqttString::from_static("c"),
        number,
        expiry_secs: 60,
        offline_since_ms: None,
        pending_will: None,
    })
}

pub(super) fn queue_put(seq: u64) -> StoreOp {
    StoreOp::QueuePut {
        number: 1,
        seq,
        qos: QoS::AtLeastOnce,
        retain: false,
        identifiers: None,
        message: message(seq),
    }
}

/// Waits (real time) until `ticket` has an outcome and returns it.
pub(super) fn outcome(store: &RocksStore, ticket: Ticket) -> Durable {
    let mut durable = store.durable();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        durable
            .wait_for(|d| d.up_to >= ticket)
            .await
            .map(|d| d.clone())
            .expect("the store is open")
    })
}

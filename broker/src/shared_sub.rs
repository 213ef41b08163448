//! Shared subscriptions (`$share/{group}/{filter}`, MQTT 5.0 4.8.2): each
//! message matching the filter goes to one member of the group.
//!
//! A group has a queue of its own (an [`Outbox`]) that the router fills
//! like any session's. Members do not get copies: each online member's
//! connection pulls from the group queue when it has room in the member's
//! Receive Maximum, so a busy or offline member is simply not served and
//! the others take its share. With several members, each takes one
//! message per turn and wakes the group again, so idle members share the
//! load in rotation. When a member's session ends, its
//! unacknowledged QoS 1 messages go back to the front of the group queue
//! for another member; QoS 2 messages in flight stay with their member, as
//! the spec requires.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use ferrymq_codec::{MqttString, QoS};
use parking_lot::Mutex;

use crate::Shared;
use crate::message::SessionId;
use crate::outbox::{Delivery, GroupQueue, Outbox};
use crate::router::Subscriber;
use crate::storage::StoreOp;

/// One member's subscription to a group.
#[derive(Clone)]
pub struct Member {
    /// The member's session.
    pub session: SessionId,
    /// The member's own outbox, whose readiness wakes its connection.
    pub outbox: Arc<Outbox>,
    /// Granted QoS.
    pub qos: QoS,
    /// Retain As Published.
    pub retain_as_published: bool,
    /// Subscription Identifier.
    pub identifier: Option<u32>,
}

/// A shared subscription group.
pub struct SharedGroup {
    /// The share name.
    pub name: MqttString,
    /// The topic filter after `$share/{name}/`.
    pub filter: MqttString,
    /// Its number (from the session number sequence) in routes.
    pub number: u64,
    /// The group's queue.
    pub outbox: Arc<Outbox>,
    /// Its members; locked on (un)subscribe and to wake members.
    members: Mutex<Vec<Member>>,
}

impl fmt::Debug for SharedGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "$share/{}/{}", self.name, self.filter)
    }
}

impl GroupQueue for SharedGroup {
    fn number(&self) -> u64 {
        self.number
    }

    fn wake(&self) {
        for m in self.members.lock().iter() {
            m.outbox.wake();
        }
    }

    fn give_back(&self, deliveries: Vec<Delivery>) {
        if deliveries.is_empty() {
            return;
        }
        self.outbox.restore(deliveries);
        self.wake();
    }
}

impl SharedGroup {
    /// Number of members.
    pub fn member_count(&self) -> usize {
        self.members.lock().len()
    }

    /// Takes `delivery` as pulled by `member`: the member's QoS, RETAIN
    /// and identifier apply.
    pub fn adapt(member: &Member, mut delivery: Delivery) -> Delivery {
        delivery.qos = delivery.qos.min(member.qos);
        delivery.retain = delivery.message.retain && member.retain_as_published;
        delivery.identifiers = member.identifier.map(|id| Arc::from([id]));
        delivery
    }
}

/// Every group, by (share name, filter).
#[derive(Default)]
pub struct Groups {
    /// Locked on shared (un)subscribes only.
    groups: Mutex<HashMap<(MqttString, MqttString), Arc<SharedGroup>>>,
}

impl Groups {
    /// Adds (or updates) `member` in the group, creating the group (its
    /// stored record and its subscription in the router) if needed.
    pub fn join(
        &self,
        shared: &Shared,
        name: MqttString,
        filter: MqttString,
        member: Member,
    ) -> Arc<SharedGroup> {
        let mut groups = self.groups.lock();
        let group = groups
            .entry((name.clone(), filter.clone()))
            .or_insert_with(|| {
                let number = shared.next_session_number();
                let outbox = shared.new_outbox(number);
                crate::storage::write(
                    shared.store.as_ref(),
                    vec![StoreOp::GroupPut {
                        number,
                        name: name.clone(),
                        filter: filter.clone(),
                    }],
                );
                create(shared, number, name.clone(), filter.clone(), outbox)
            })
            .clone();
        drop(groups);
        let mut members = group.members.lock();
        members.retain(|m| m.session != member.session);
        members.push(member);
        drop(members);
        // It may have messages waiting for a member.
        group.wake();
        group
    }

    /// Removes `session` from `group`; the last member to leave ends the
    /// group (its queue is discarded: nobody subscribes any more).
    pub fn leave(&self, shared: &Shared, group: &Arc<SharedGroup>, session: SessionId) {
        let empty = {
            let mut members = group.members.lock();
            members.retain(|m| m.session != session);
            members.is_empty()
        };
        if !empty {
            return;
        }
        let mut groups = self.groups.lock();
        let key = (group.name.clone(), group.filter.clone());
        // Another member may have joined meanwhile.
        if groups.get(&key).is_some_and(|g| Arc::ptr_eq(g, group))
            && group.members.lock().is_empty()
        {
            groups.remove(&key);
            end(shared, group);
            crate::storage::write(
                shared.store.as_ref(),
                vec![StoreOp::GroupDelete {
                    number: group.number,
                }],
            );
        }
    }

    /// Recreates a group recovered from the store (its members rejoin as
    /// their sessions are restored).
    pub fn restore(
        &self,
        shared: &Shared,
        number: u64,
        name: MqttString,
        filter: MqttString,
        outbox: Arc<Outbox>,
    ) {
        let group = create(shared, number, name.clone(), filter.clone(), outbox);
        self.groups.lock().insert((name, filter), group);
    }

    /// The group with this number.
    pub fn by_number(&self, number: u64) -> Option<Arc<SharedGroup>> {
        self.groups
            .lock()
            .values()
            .find(|g| g.number == number)
            .cloned()
    }

    /// Ends the groups nobody belongs to (after a restart whose member
    /// sessions all expired).
    pub fn prune_empty(&self, shared: &Shared, batch: &mut crate::storage::Batch<'_>) {
        let mut groups = self.groups.lock();
        groups.retain(|_, group| {
            if group.member_count() > 0 {
                return true;
            }
            end(shared, group);
            batch.push(StoreOp::GroupDelete {
                number: group.number,
            });
            false
        });
    }
}

/// A group's queue is stored: the group takes every message, QoS 0
/// included, whoever of its members is online.
fn create(
    shared: &Shared,
    number: u64,
    name: MqttString,
    filter: MqttString,
    outbox: Arc<Outbox>,
) -> Arc<SharedGroup> {
    outbox.set_online(true);
    outbox.set_persistent(true);
    let group = Arc::new(SharedGroup {
        name,
        filter: filter.clone(),
        number,
        outbox: outbox.clone(),
        members: Mutex::new(Vec::new()),
    });
    shared.router.subscribe(
        &filter,
        Subscriber {
            session: SessionId(number),
            outbox,
            qos: QoS::ExactlyOnce,
            no_local: false,
            retain_as_published: true,
            identifier: None,
            group: Some(group.clone()),
        },
    );
    group
}

fn end(shared: &Shared, group: &SharedGroup) {
    shared
        .router
        .unsubscribe(&group.filter, SessionId(group.number));
    group.outbox.close();
}

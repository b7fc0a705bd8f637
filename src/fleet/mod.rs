//! Scale-out on engines people already run: live sources split over processes by
//! rendezvous hashing ([`shard`], `percept run --shard K/N`, one StatefulSet pod per shard),
//! and recordings shared out to a pool of workers through a Redis Streams consumer group
//! ([`queue`], `percept enqueue` and `percept analyze --queue`).

pub mod cli;
pub mod queue;
pub mod shard;

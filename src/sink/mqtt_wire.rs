//! The few MQTT 3.1.1 packets a publisher needs (CONNECT with a will, PUBLISH at QoS 0/1,
//! PUBACK, PINGREQ, DISCONNECT), encoded and decoded by hand: percept must know which PUBLISH
//! a PUBACK answers (it chooses the packet ids), and must resend what a broker never
//! acknowledged, whatever the session state; client libraries hide both.

use std::io::{self, Read};

pub const CONNECT: u8 = 1;
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PINGRESP: u8 = 13;

/// Largest remaining length MQTT can express.
pub const MAX_REMAINING: usize = 268_435_455;

/// A message with the will flag: sent by the broker when the connection dies.
pub struct Will<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub retain: bool,
}

pub struct Connect<'a> {
    pub client_id: &'a str,
    pub clean_session: bool,
    pub keep_alive_s: u16,
    pub user: Option<&'a str>,
    pub password: Option<&'a str>,
    pub will: Option<Will<'a>>,
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(first);
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

pub fn connect(c: &Connect<'_>) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    put_str(&mut body, b"MQTT");
    body.push(4); // protocol level 3.1.1
    let mut flags = 0u8;
    if c.user.is_some() {
        flags |= 0x80;
    }
    if c.user.is_some() && c.password.is_some() {
        flags |= 0x40;
    }
    if let Some(w) = &c.will {
        flags |= 0x04 | 0x08; // will, QoS 1
        if w.retain {
            flags |= 0x20;
        }
    }
    if c.clean_session {
        flags |= 0x02;
    }
    body.push(flags);
    body.extend_from_slice(&c.keep_alive_s.to_be_bytes());
    put_str(&mut body, c.client_id.as_bytes());
    if let Some(w) = &c.will {
        put_str(&mut body, w.topic.as_bytes());
        put_str(&mut body, w.payload);
    }
    if let Some(u) = c.user {
        put_str(&mut body, u.as_bytes());
        if let Some(p) = c.password {
            put_str(&mut body, p.as_bytes());
        }
    }
    frame(CONNECT << 4, &body)
}

/// A PUBLISH; `pkid` is used at QoS 1 only.
pub fn publish(topic: &str, payload: &[u8], qos1: bool, retain: bool, pkid: u16) -> Vec<u8> {
    let mut body = Vec::with_capacity(topic.len() + payload.len() + 4);
    put_str(&mut body, topic.as_bytes());
    if qos1 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    let first = (PUBLISH << 4) | if qos1 { 0x02 } else { 0 } | u8::from(retain);
    frame(first, &body)
}

pub fn puback(pkid: u16) -> Vec<u8> {
    frame(PUBACK << 4, &pkid.to_be_bytes())
}

pub fn pingreq() -> Vec<u8> {
    vec![0xc0, 0]
}

pub fn disconnect() -> Vec<u8> {
    vec![0xe0, 0]
}

/// One packet from the broker: its type, the flags of the first byte, and the rest.
#[derive(Debug, PartialEq, Eq)]
pub struct Packet {
    pub kind: u8,
    pub flags: u8,
    pub body: Vec<u8>,
}

impl Packet {
    /// The packet id of a PUBACK (or of a QoS 1 PUBLISH sent to us).
    pub fn pkid(&self) -> Option<u16> {
        match self.kind {
            PUBACK => self.body.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])),
            PUBLISH if self.flags & 0x06 != 0 => {
                let tlen = usize::from(u16::from_be_bytes([
                    *self.body.first()?,
                    *self.body.get(1)?,
                ]));
                let b = self.body.get(2 + tlen..4 + tlen)?;
                Some(u16::from_be_bytes([b[0], b[1]]))
            }
            _ => None,
        }
    }
}

/// Reads one whole packet (blocking).
pub fn read_packet(r: &mut impl Read) -> io::Result<Packet> {
    let mut first = [0u8; 1];
    r.read_exact(&mut first)?;
    let mut len = 0usize;
    let mut mult = 1usize;
    for i in 0..4 {
        let mut b = [0u8; 1];
        r.read_exact(&mut b)?;
        len += usize::from(b[0] & 0x7f) * mult;
        if b[0] & 0x80 == 0 {
            break;
        }
        if i == 3 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "MQTT: bad remaining length",
            ));
        }
        mult *= 128;
    }
    // Brokers send us small packets only (acks); refuse to allocate for nonsense.
    if len > 1 << 20 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "MQTT: packet from the broker too large",
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Packet {
        kind: first[0] >> 4,
        flags: first[0] & 0x0f,
        body,
    })
}

/// CONNACK's (session present, return code).
pub fn connack(p: &Packet) -> Option<(bool, u8)> {
    (p.kind == CONNACK && p.body.len() >= 2).then(|| (p.body[0] & 1 == 1, p.body[1]))
}

/// What a CONNACK refusal code means.
pub fn connack_reason(code: u8) -> &'static str {
    match code {
        1 => "unacceptable protocol version",
        2 => "client id rejected",
        3 => "server unavailable",
        4 => "bad user name or password",
        5 => "not authorized",
        _ => "refused",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn packets_round_trip() {
        let p = publish("a/b", &[7u8; 200], true, true, 513);
        // 0x33: PUBLISH, QoS 1, retain; 200 + 2 + 3 + 2 = 207 = 0xcf 0x01.
        assert_eq!(&p[..3], &[0x33, 0xcf, 0x01]);
        let back = read_packet(&mut &p[..]).unwrap();
        assert_eq!(back.kind, PUBLISH);
        assert_eq!(back.pkid(), Some(513));
        let a = read_packet(&mut &puback(9)[..]).unwrap();
        assert_eq!(a.pkid(), Some(9));
        let c = connect(&Connect {
            client_id: "percept",
            clean_session: false,
            keep_alive_s: 15,
            user: Some("u"),
            password: Some("p"),
            will: Some(Will {
                topic: "percept/status",
                payload: b"offline",
                retain: true,
            }),
        });
        let back = read_packet(&mut &c[..]).unwrap();
        assert_eq!(back.kind, CONNECT);
        // Flags: user, password, will retain, will QoS 1, will; not clean.
        assert_eq!(back.body[7], 0x80 | 0x40 | 0x20 | 0x08 | 0x04);
        assert_eq!(
            connack(&Packet {
                kind: CONNACK,
                flags: 0,
                body: vec![1, 0]
            }),
            Some((true, 0))
        );
    }
}

//! DNS queries from the guest and the gateway's answers (RFC 1035), IPv4 only.
//!
//! Only standard queries with exactly one question are accepted. Names are returned lowercase
//! without the trailing dot. Compression pointers are refused in queries (no resolver sends
//! them in a question).

use std::net::Ipv4Addr;

use crate::policy::{DomainError, validate_domain};

/// Record type A.
pub const TYPE_A: u16 = 1;
/// Record type AAAA.
pub const TYPE_AAAA: u16 = 28;
/// Class IN.
pub const CLASS_IN: u16 = 1;
/// Largest query accepted (classic UDP DNS limit).
pub const MAX_QUERY_BYTES: usize = 512;

/// Response codes the gateway uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rcode {
    /// 1: the query could not be parsed.
    FormErr,
    /// 2: resolving failed on the host.
    ServFail,
    /// 3: the name is not allowed (answered as not existing, so programs fail fast).
    NxDomain,
    /// 4: an opcode or class the gateway does not serve.
    NotImp,
    /// 5: refused.
    Refused,
}

/// One parsed query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Transaction id, echoed in the answer.
    pub id: u16,
    /// Recursion desired flag, echoed in the answer.
    pub recursion_desired: bool,
    /// The question's name: lowercase ASCII, labels joined by `.`, no trailing dot; empty for
    /// the root.
    pub name: String,
    /// Question type.
    pub qtype: u16,
    /// Question class.
    pub qclass: u16,
    /// The question section exactly as received (name + type + class), echoed in answers.
    pub question: Vec<u8>,
}

/// Why a packet is not a query the gateway answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// Larger than [`MAX_QUERY_BYTES`].
    #[error("DNS query is {len} bytes; the limit is {MAX_QUERY_BYTES}")]
    TooLong {
        /// The packet's length.
        len: usize,
    },
    /// The packet ends inside the header or the question.
    #[error("DNS query is truncated: it ends inside the {part} ({len} bytes)")]
    Truncated {
        /// What was being read: "header", "question name", "question type and class".
        part: &'static str,
        /// The packet's length.
        len: usize,
    },
    /// The QR bit says this is a response.
    #[error("DNS packet is a response (QR=1), not a query")]
    NotAQuery,
    /// An opcode other than 0 (standard query).
    #[error("DNS opcode {0} is not served; only 0 (standard query) is")]
    Opcode(u8),
    /// Not exactly one question.
    #[error("DNS query has {0} questions; exactly 1 is required")]
    QuestionCount(u16),
    /// Answer or authority records in a query.
    #[error("DNS query carries {answers} answer and {authority} authority records; 0 are allowed")]
    UnexpectedRecords {
        /// ANCOUNT.
        answers: u16,
        /// NSCOUNT.
        authority: u16,
    },
    /// A compression pointer in the question name.
    #[error("DNS question name uses a compression pointer; queries must spell the name out")]
    CompressedName,
    /// A label length byte with the reserved high bits `01` or `10` (a label over 63 bytes).
    #[error("DNS question name has a label length byte {0:#04x}; labels are at most 63 bytes")]
    LabelTooLong(u8),
    /// A name over 255 bytes in wire form.
    #[error("DNS question name is over {len} bytes in wire form; the limit is 255")]
    NameTooLong {
        /// Wire bytes read when the limit was passed.
        len: usize,
    },
    /// A byte other than ASCII letters, digits and hyphens in a label.
    #[error(
        "DNS question name contains byte {0:#04x}; labels may hold only ASCII letters, digits and hyphens"
    )]
    BadNameByte(u8),
    /// A name that is not a valid host name.
    #[error("DNS question name: {0}")]
    BadName(#[from] DomainError),
}

/// Length of the DNS header.
const HEADER_BYTES: usize = 12;
/// Longest name in wire form (RFC 1035 §2.3.4).
const MAX_WIRE_NAME_BYTES: usize = 255;
/// Header flag: response.
const FLAG_QR: u16 = 0x8000;
/// Header flag: recursion desired.
const FLAG_RD: u16 = 0x0100;
/// Header flag: recursion available.
const FLAG_RA: u16 = 0x0080;
/// Largest answer built: the classic UDP limit, so no client needs EDNS or TCP.
const MAX_ANSWER_BYTES: usize = 512;
/// Bytes of one A record whose name is a pointer to the question.
const A_RECORD_BYTES: usize = 16;

/// The big-endian `u16` at `at`, if `packet` holds it.
fn be16(packet: &[u8], at: usize) -> Option<u16> {
    let bytes = packet.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]))
}

/// Parses a DNS query packet (a UDP payload).
///
/// Records in the additional section (an EDNS OPT record, for example) are ignored.
pub fn parse_query(packet: &[u8]) -> Result<Query, DnsError> {
    let len = packet.len();
    if len > MAX_QUERY_BYTES {
        return Err(DnsError::TooLong { len });
    }
    let header = |at| {
        be16(packet, at).ok_or(DnsError::Truncated {
            part: "header",
            len,
        })
    };
    let id = header(0)?;
    let flags = header(2)?;
    let questions = header(4)?;
    let answers = header(6)?;
    let authority = header(8)?;
    let _additional = header(10)?;
    if flags & FLAG_QR != 0 {
        return Err(DnsError::NotAQuery);
    }
    let opcode = ((flags >> 11) & 0x0f) as u8;
    if opcode != 0 {
        return Err(DnsError::Opcode(opcode));
    }
    if questions != 1 {
        return Err(DnsError::QuestionCount(questions));
    }
    if answers != 0 || authority != 0 {
        return Err(DnsError::UnexpectedRecords { answers, authority });
    }

    let (name, name_end) = read_question_name(packet)?;
    let fixed = |at| {
        be16(packet, at).ok_or(DnsError::Truncated {
            part: "question type and class",
            len,
        })
    };
    let qtype = fixed(name_end)?;
    let qclass = fixed(name_end + 2)?;
    let question = packet
        .get(HEADER_BYTES..name_end + 4)
        .ok_or(DnsError::Truncated {
            part: "question type and class",
            len,
        })?
        .to_vec();
    Ok(Query {
        id,
        recursion_desired: flags & FLAG_RD != 0,
        name,
        qtype,
        qclass,
        question,
    })
}

/// Reads the question name starting right after the header: the validated, lowercase name
/// (empty for the root) and the offset just past it.
fn read_question_name(packet: &[u8]) -> Result<(String, usize), DnsError> {
    let truncated = DnsError::Truncated {
        part: "question name",
        len: packet.len(),
    };
    let mut name = String::new();
    let mut at = HEADER_BYTES;
    loop {
        let wire_len = at - HEADER_BYTES + 1;
        if wire_len > MAX_WIRE_NAME_BYTES {
            return Err(DnsError::NameTooLong { len: wire_len });
        }
        let &length = packet.get(at).ok_or_else(|| truncated.clone())?;
        at += 1;
        match length & 0xc0 {
            0x00 => {}
            0xc0 => return Err(DnsError::CompressedName),
            _ => return Err(DnsError::LabelTooLong(length)),
        }
        if length == 0 {
            break;
        }
        let label = packet
            .get(at..at + usize::from(length))
            .ok_or_else(|| truncated.clone())?;
        at += label.len();
        if !name.is_empty() {
            name.push('.');
        }
        for &byte in label {
            if !(byte.is_ascii_alphanumeric() || byte == b'-') {
                return Err(DnsError::BadNameByte(byte));
            }
            name.push(char::from(byte.to_ascii_lowercase()));
        }
    }
    if at - HEADER_BYTES > MAX_WIRE_NAME_BYTES {
        return Err(DnsError::NameTooLong {
            len: at - HEADER_BYTES,
        });
    }
    if name.is_empty() {
        return Ok((name, at));
    }
    Ok((validate_domain(&name)?, at))
}

/// The transaction id of `packet`, if it has a header: lets the gateway answer FORMERR to a
/// packet [`parse_query`] rejects.
pub fn query_id(packet: &[u8]) -> Option<u16> {
    if packet.len() < HEADER_BYTES {
        return None;
    }
    be16(packet, 0)
}

impl Rcode {
    /// The RCODE field value.
    fn code(self) -> u16 {
        match self {
            Rcode::FormErr => 1,
            Rcode::ServFail => 2,
            Rcode::NxDomain => 3,
            Rcode::NotImp => 4,
            Rcode::Refused => 5,
        }
    }
}

/// A response header with `id`, QR and RA set, RD as given, `rcode`, and these counts.
fn header(id: u16, recursion_desired: bool, rcode: u16, questions: u16, answers: u16) -> Vec<u8> {
    let rd = if recursion_desired { FLAG_RD } else { 0 };
    let flags = FLAG_QR | rd | FLAG_RA | (rcode & 0x0f);
    let mut out = Vec::with_capacity(MAX_ANSWER_BYTES);
    for field in [id, flags, questions, answers, 0, 0] {
        out.extend_from_slice(&field.to_be_bytes());
    }
    out
}

/// A NOERROR answer to `query` with one A record per address (none: "no data"), each with
/// `ttl` seconds. The answer names point at the echoed question.
///
/// Records that would make the answer larger than 512 bytes (the classic UDP limit) are left
/// out: with a question of the longest name, that still leaves room for 15 addresses.
pub fn answer_a(query: &Query, addrs: &[Ipv4Addr], ttl: u32) -> Vec<u8> {
    let room = MAX_ANSWER_BYTES.saturating_sub(HEADER_BYTES + query.question.len());
    let count = addrs
        .len()
        .min(room / A_RECORD_BYTES)
        .min(usize::from(u16::MAX));
    let mut out = header(query.id, query.recursion_desired, 0, 1, count as u16);
    out.extend_from_slice(&query.question);
    // The question starts right after the header: a compression pointer to offset 12.
    let pointer = 0xc000 | HEADER_BYTES as u16;
    for addr in addrs.iter().take(count) {
        out.extend_from_slice(&pointer.to_be_bytes());
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&addr.octets());
    }
    out
}

/// An answer to `query` carrying only `rcode` (and the echoed question).
pub fn answer_error(query: &Query, rcode: Rcode) -> Vec<u8> {
    let mut out = header(query.id, query.recursion_desired, rcode.code(), 1, 0);
    out.extend_from_slice(&query.question);
    out
}

/// A header-only FORMERR answer for a packet with transaction id `id`.
pub fn answer_formerr(id: u16) -> Vec<u8> {
    header(id, false, Rcode::FormErr.code(), 0, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Bytes from hex, whitespace ignored.
    fn hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    /// `A example.com` as glibc's stub resolver sends it: RD set, no EDNS.
    const GLIBC_A_EXAMPLE_COM: &str = "
        abcd 0100 0001 0000 0000 0000
        07 6578616d706c65 03 636f6d 00  0001 0001";

    /// `AAAA WWW.Example.COM` as `dig` sends it: RD and AD set, an EDNS OPT record with a
    /// client cookie in the additional section.
    const DIG_AAAA_WITH_EDNS: &str = "
        1234 0120 0001 0000 0000 0001
        03 575757 07 4578616d706c65 03 434f4d 00  001c 0001
        00 0029 04d0 00 00 0000 000c  000a 0008 0123456789abcdef";

    /// A decoded answer, for checking what the gateway sends.
    #[derive(Debug)]
    struct Answer {
        id: u16,
        flags: u16,
        counts: [u16; 4],
        question: Vec<u8>,
        records: Vec<(u16, u16, u16, u32, Vec<u8>)>,
    }

    /// Decodes an answer built by this module (names as pointers to the question).
    fn decode_answer(bytes: &[u8], question_len: usize) -> Answer {
        let field = |at: usize| u16::from_be_bytes([bytes[at], bytes[at + 1]]);
        let counts = [field(4), field(6), field(8), field(10)];
        let question = bytes[12..12 + question_len].to_vec();
        let mut at = 12 + question_len;
        let mut records = Vec::new();
        for _ in 0..counts[1] {
            let ttl = u32::from_be_bytes(bytes[at + 6..at + 10].try_into().unwrap());
            let rdlen = usize::from(field(at + 10));
            let rdata = bytes[at + 12..at + 12 + rdlen].to_vec();
            records.push((field(at), field(at + 2), field(at + 4), ttl, rdata));
            at += 12 + rdlen;
        }
        assert_eq!(at, bytes.len(), "trailing bytes in answer");
        Answer {
            id: field(0),
            flags: field(2),
            counts,
            question,
            records,
        }
    }

    /// A query for `labels` with the given id, flags and type.
    fn build_query(id: u16, flags: u16, labels: &[&[u8]], qtype: u16) -> Vec<u8> {
        let mut packet = Vec::new();
        for field in [id, flags, 1, 0, 0, 0] {
            packet.extend_from_slice(&field.to_be_bytes());
        }
        for label in labels {
            packet.push(label.len() as u8);
            packet.extend_from_slice(label);
        }
        packet.push(0);
        packet.extend_from_slice(&qtype.to_be_bytes());
        packet.extend_from_slice(&CLASS_IN.to_be_bytes());
        packet
    }

    #[test]
    fn parses_a_glibc_a_query() {
        let packet = hex(GLIBC_A_EXAMPLE_COM);
        let query = parse_query(&packet).unwrap();
        assert_eq!(
            query,
            Query {
                id: 0xabcd,
                recursion_desired: true,
                name: "example.com".into(),
                qtype: TYPE_A,
                qclass: CLASS_IN,
                question: packet[12..].to_vec(),
            }
        );
        assert_eq!(query_id(&packet), Some(0xabcd));
    }

    #[test]
    fn parses_a_dig_aaaa_query_with_edns_lowercasing_the_name() {
        let packet = hex(DIG_AAAA_WITH_EDNS);
        let query = parse_query(&packet).unwrap();
        assert_eq!(query.id, 0x1234);
        assert!(query.recursion_desired);
        assert_eq!(query.name, "www.example.com");
        assert_eq!(query.qtype, TYPE_AAAA);
        assert_eq!(query.qclass, CLASS_IN);
        // The question is echoed exactly as received, original case included; no OPT record.
        assert_eq!(
            query.question,
            hex("03575757074578616d706c6503434f4d00001c0001")
        );
    }

    #[test]
    fn parses_the_root_and_other_classes() {
        let packet = build_query(7, 0, &[], 2);
        let query = parse_query(&packet).unwrap();
        assert_eq!(query.name, "");
        assert!(!query.recursion_desired);
        assert_eq!(query.question, [0, 0, 2, 0, 1]);
        let mut chaos = build_query(8, 0x0100, &[b"version", b"bind"], 16);
        let len = chaos.len();
        chaos[len - 1] = 3;
        assert_eq!(parse_query(&chaos).unwrap().qclass, 3);
    }

    #[test]
    fn refuses_what_is_not_a_one_question_standard_query() {
        let good = hex(GLIBC_A_EXAMPLE_COM);
        let with = |at: usize, bytes: &[u8]| {
            let mut packet = good.clone();
            packet[at..at + bytes.len()].copy_from_slice(bytes);
            parse_query(&packet)
        };
        assert_eq!(with(4, &[0, 2]), Err(DnsError::QuestionCount(2)));
        assert_eq!(with(4, &[0, 0]), Err(DnsError::QuestionCount(0)));
        assert_eq!(with(2, &[0x81, 0x80]), Err(DnsError::NotAQuery));
        assert_eq!(with(2, &[0x20, 0x00]), Err(DnsError::Opcode(4)));
        assert_eq!(with(2, &[0x28, 0x00]), Err(DnsError::Opcode(5)));
        assert_eq!(
            with(6, &[0, 1, 0, 2]),
            Err(DnsError::UnexpectedRecords {
                answers: 1,
                authority: 2
            })
        );
        // Two questions really present.
        let mut two = good.clone();
        two[5] = 2;
        two.extend_from_slice(&good[12..]);
        assert_eq!(parse_query(&two), Err(DnsError::QuestionCount(2)));
        let message = DnsError::QuestionCount(2).to_string();
        assert!(message.contains("2 questions; exactly 1"), "{message}");
    }

    #[test]
    fn refuses_compression_pointers_and_long_labels() {
        // `www` followed by a pointer to offset 12.
        let mut pointer = hex("abcd 0100 0001 0000 0000 0000 03 777777 c00c 0001 0001");
        assert_eq!(parse_query(&pointer), Err(DnsError::CompressedName));
        pointer[16] = 0xc0;
        assert_eq!(parse_query(&pointer), Err(DnsError::CompressedName));
        // A 64-byte label: its length byte has the reserved bits 01.
        let long = build_query(1, 0, &[&[b'a'; 64], b"com"], TYPE_A);
        assert_eq!(parse_query(&long), Err(DnsError::LabelTooLong(64)));
        let message = DnsError::LabelTooLong(64).to_string();
        assert!(
            message.contains("0x40") && message.contains("63"),
            "{message}"
        );
        let max = build_query(1, 0, &[&[b'a'; 63], b"com"], TYPE_A);
        assert_eq!(parse_query(&max).unwrap().name.len(), 67);
        // Five 63-byte labels: 321 bytes in wire form.
        let label = [b'a'; 63];
        let huge = build_query(1, 0, &[&label, &label, &label, &label, &label], TYPE_A);
        assert!(matches!(
            parse_query(&huge),
            Err(DnsError::NameTooLong { .. })
        ));
        // Four 63-byte labels: 257 bytes in wire form.
        let just_over = build_query(1, 0, &[&label, &label, &label, &label], TYPE_A);
        assert!(matches!(
            parse_query(&just_over),
            Err(DnsError::NameTooLong { .. })
        ));
        // 63+63+63+61 bytes: 255 in wire form, 253 in text.
        let longest = build_query(1, 0, &[&label, &label, &label, &[b'b'; 61]], TYPE_A);
        assert_eq!(parse_query(&longest).unwrap().name.len(), 253);
    }

    #[test]
    fn refuses_names_that_are_not_host_names() {
        let underscore = build_query(1, 0, &[b"_dmarc", b"example", b"com"], TYPE_A);
        assert_eq!(parse_query(&underscore), Err(DnsError::BadNameByte(b'_')));
        let binary = build_query(1, 0, &[b"a\0b", b"com"], TYPE_A);
        assert_eq!(parse_query(&binary), Err(DnsError::BadNameByte(0)));
        let dot = build_query(1, 0, &[b"a.b", b"com"], TYPE_A);
        assert_eq!(parse_query(&dot), Err(DnsError::BadNameByte(b'.')));
        let address = build_query(1, 0, &[b"1", b"2", b"3", b"4"], TYPE_A);
        assert!(matches!(
            parse_query(&address),
            Err(DnsError::BadName(DomainError::AddressLiteral { .. }))
        ));
        let hyphen = build_query(1, 0, &[b"-a", b"com"], TYPE_A);
        assert!(matches!(parse_query(&hyphen), Err(DnsError::BadName(_))));
        let empty_label = build_query(1, 0, &[b"", b"com"], TYPE_A);
        // An empty label ends the name: then the type and class are read from `03 'co'`.
        assert!(parse_query(&empty_label).is_ok_and(|q| q.name.is_empty()));
    }

    #[test]
    fn every_truncation_is_an_error() {
        for fixture in [GLIBC_A_EXAMPLE_COM, DIG_AAAA_WITH_EDNS] {
            let packet = hex(fixture);
            let question_end = 12 + parse_query(&packet).unwrap().question.len();
            for len in 0..question_end {
                let result = parse_query(&packet[..len]);
                assert!(
                    matches!(result, Err(DnsError::Truncated { .. })),
                    "prefix {len}: {result:?}"
                );
                assert_eq!(query_id(&packet[..len]).is_some(), len >= 12);
            }
            // The additional section is not needed.
            for len in question_end..=packet.len() {
                assert!(parse_query(&packet[..len]).is_ok(), "prefix {len}");
            }
        }
    }

    #[test]
    fn refuses_oversized_packets() {
        let mut packet = hex(GLIBC_A_EXAMPLE_COM);
        packet.resize(MAX_QUERY_BYTES, 0);
        assert!(parse_query(&packet).is_ok());
        packet.push(0);
        assert_eq!(parse_query(&packet), Err(DnsError::TooLong { len: 513 }));
        let message = parse_query(&packet).unwrap_err().to_string();
        assert!(message.contains("513 bytes; the limit is 512"), "{message}");
    }

    #[test]
    fn answer_a_carries_the_records() {
        let packet = hex(GLIBC_A_EXAMPLE_COM);
        let query = parse_query(&packet).unwrap();
        let addrs = [Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(203, 0, 113, 80)];
        let bytes = answer_a(&query, &addrs, 60);
        let answer = decode_answer(&bytes, query.question.len());
        assert_eq!(answer.id, 0xabcd);
        // QR, RD echoed, RA; opcode 0, not authoritative, not truncated, NOERROR.
        assert_eq!(answer.flags, 0x8180);
        assert_eq!(answer.counts, [1, 2, 0, 0]);
        assert_eq!(answer.question, query.question);
        assert_eq!(
            answer.records,
            vec![
                (0xc00c, TYPE_A, CLASS_IN, 60, vec![198, 18, 0, 1]),
                (0xc00c, TYPE_A, CLASS_IN, 60, vec![203, 0, 113, 80]),
            ]
        );
        // A response is not a query.
        assert_eq!(parse_query(&bytes), Err(DnsError::NotAQuery));
        assert_eq!(query_id(&bytes), Some(0xabcd));
    }

    #[test]
    fn answer_a_without_addresses_is_no_data_and_echoes_rd() {
        let packet = build_query(0x0102, 0, &[b"example", b"com"], TYPE_AAAA);
        let query = parse_query(&packet).unwrap();
        let answer = decode_answer(&answer_a(&query, &[], 300), query.question.len());
        assert_eq!(answer.id, 0x0102);
        assert_eq!(answer.flags, 0x8080, "RD clear as in the query");
        assert_eq!(answer.counts, [1, 0, 0, 0]);
        assert!(answer.records.is_empty());
    }

    #[test]
    fn answer_a_stays_within_512_bytes() {
        let label = [b'a'; 63];
        let packet = build_query(1, 0x0100, &[&label, &label, &label, &[b'b'; 61]], TYPE_A);
        let query = parse_query(&packet).unwrap();
        let addrs: Vec<Ipv4Addr> = (0..100).map(|i| Ipv4Addr::new(203, 0, 113, i)).collect();
        let bytes = answer_a(&query, &addrs, u32::MAX);
        assert!(bytes.len() <= 512, "{}", bytes.len());
        let answer = decode_answer(&bytes, query.question.len());
        assert_eq!(answer.counts[1], 15);
        assert_eq!(answer.records[14].4, vec![203, 0, 113, 14]);
        assert_eq!(answer.records[0].3, u32::MAX);
    }

    #[test]
    fn error_answers() {
        let query = parse_query(&hex(GLIBC_A_EXAMPLE_COM)).unwrap();
        for (rcode, code) in [
            (Rcode::FormErr, 1),
            (Rcode::ServFail, 2),
            (Rcode::NxDomain, 3),
            (Rcode::NotImp, 4),
            (Rcode::Refused, 5),
        ] {
            let answer = decode_answer(&answer_error(&query, rcode), query.question.len());
            assert_eq!(answer.id, 0xabcd);
            assert_eq!(answer.flags, 0x8180 | code);
            assert_eq!(answer.counts, [1, 0, 0, 0]);
            assert_eq!(answer.question, query.question);
        }
        let formerr = answer_formerr(0xbeef);
        assert_eq!(formerr, hex("beef 8081 0000 0000 0000 0000"));
    }

    proptest! {
        #[test]
        fn parse_query_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(query) = parse_query(&bytes) {
                prop_assert!(query.name.len() <= 253);
                prop_assert!(query.question.len() <= 255 + 4);
                prop_assert!(answer_a(&query, &[Ipv4Addr::LOCALHOST], 1).len() <= 512);
            }
            prop_assert_eq!(query_id(&bytes).is_some(), bytes.len() >= 12);
        }

        #[test]
        fn mutated_queries_never_panic(at in 0usize..64, byte in any::<u8>(), cut in 0usize..80) {
            let mut packet = hex(DIG_AAAA_WITH_EDNS);
            if let Some(b) = packet.get_mut(at) {
                *b = byte;
            }
            packet.truncate(cut);
            let _ = parse_query(&packet);
        }

        #[test]
        fn queries_round_trip(
            id in any::<u16>(),
            rd in any::<bool>(),
            labels in proptest::collection::vec("[a-zA-Z][a-zA-Z0-9-]{0,10}[a-zA-Z0-9]", 1..6),
            qtype in any::<u16>(),
            addrs in proptest::collection::vec(any::<u32>(), 0..10),
            ttl in any::<u32>(),
        ) {
            let labels: Vec<&[u8]> = labels.iter().map(|l| l.as_bytes()).collect();
            let packet = build_query(id, if rd { 0x0100 } else { 0 }, &labels, qtype);
            let query = parse_query(&packet).unwrap();
            prop_assert_eq!(query.id, id);
            prop_assert_eq!(query.recursion_desired, rd);
            prop_assert_eq!(query.qtype, qtype);
            let name = labels.iter().map(|l| std::str::from_utf8(l).unwrap()).collect::<Vec<_>>().join(".");
            prop_assert_eq!(&query.name, &name.to_ascii_lowercase());
            prop_assert_eq!(&query.question[..], &packet[12..]);

            // An error answer is the query with QR and an rcode set: clearing them parses back.
            let mut echoed = answer_error(&query, Rcode::NxDomain);
            echoed[2] &= 0x7f;
            prop_assert_eq!(parse_query(&echoed), Ok(query.clone()));

            let addrs: Vec<Ipv4Addr> = addrs.into_iter().map(Ipv4Addr::from).collect();
            let answer = decode_answer(&answer_a(&query, &addrs, ttl), query.question.len());
            prop_assert_eq!(answer.id, id);
            prop_assert_eq!(answer.flags & 0x0100 != 0, rd);
            prop_assert_eq!(answer.flags & 0x8080, 0x8080);
            prop_assert_eq!(answer.counts, [1, addrs.len() as u16, 0, 0]);
            let got: Vec<Ipv4Addr> = answer.records.iter().map(|r| {
                Ipv4Addr::new(r.4[0], r.4[1], r.4[2], r.4[3])
            }).collect();
            prop_assert_eq!(got, addrs);
        }
    }
}

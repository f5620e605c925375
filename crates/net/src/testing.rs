//! Builders of the guest bytes the unit tests feed to the parsers and decisions.

/// A minimal TLS 1.3 ClientHello record naming `name` (the bytes as given, unvalidated).
pub fn client_hello(name: &str) -> Vec<u8> {
    let mut sni = vec![0];
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name.as_bytes());
    let mut ext = (sni.len() as u16).to_be_bytes().to_vec();
    ext.extend_from_slice(&sni);
    let mut extensions = vec![0, 0];
    extensions.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    extensions.extend_from_slice(&ext);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]);
    body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    body.extend_from_slice(&extensions);
    let mut message = vec![1, 0];
    message.extend_from_slice(&(body.len() as u16).to_be_bytes());
    message.extend_from_slice(&body);
    let mut record = vec![22, 3, 1];
    record.extend_from_slice(&(message.len() as u16).to_be_bytes());
    record.extend_from_slice(&message);
    record
}

/// A standard one-question query (RD set) for `name` (labels split at dots, as given).
pub fn dns_query(id: u16, name: &str, qtype: u16, qclass: u16) -> Vec<u8> {
    let mut out = Vec::new();
    for field in [id, 0x0100, 1, 0, 0, 0] {
        out.extend_from_slice(&field.to_be_bytes());
    }
    for label in name.split('.').filter(|l| !l.is_empty()) {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&qclass.to_be_bytes());
    out
}

//! What containerd hands the shim at `start` on standard input, and what the shim answers.
//!
//! containerd 2.3+ writes a protobuf `BootstrapParams` (`containerd.runtime.bootstrap.v1`,
//! containerd's `api/runtime/bootstrap/v1/bootstrap.proto`): instance id, namespace, log
//! level, containerd's version, its TTRPC and gRPC addresses and binary, the runtime options as
//! an extension (`google.protobuf.Any`), and optionally the directory for the shim's socket.
//! containerd 1.6–2.2 write the runtime options `Any` itself, or nothing. An `Any` can decode
//! as `BootstrapParams` too (its fields 1 and 2 are strings/bytes), so, as containerd's own
//! shims do, the input counts as `BootstrapParams` only when its `instance_id` and `namespace`
//! equal the `-id` and `-namespace` flags; anything else is the legacy input, and input that
//! is neither is ignored rather than failing `start` ([`StartInput::classify`]).
//!
//! The answer to `BootstrapParams` is a protobuf `BootstrapResult` (version 2, the address,
//! protocol `ttrpc`: [`encode_result`]), which containerd 2.3+ reads first; older containerds
//! get the plain address, which 2.3 also still accepts.
//!
//! The wire format is decoded here by hand (varints and length-delimited fields are all these
//! messages use); unknown fields are skipped, as protobuf readers must.

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;

/// `LogLevel` values at or below this are debug or trace (`LOG_LEVEL_DEBUG = -4`).
const LOG_LEVEL_DEBUG: i32 = -4;
/// The shim API version the answer names (shim v2).
const SHIM_VERSION: u64 = 2;
/// The protocol the shim serves its Task API with.
const PROTOCOL: &str = "ttrpc";

const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_FIXED32: u8 = 5;

/// Why bytes are not a well-formed message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated at byte {offset}")]
    Truncated { offset: usize },
    #[error("varint longer than 10 bytes at byte {offset}")]
    VarintTooLong { offset: usize },
    #[error("field number 0 at byte {offset}")]
    FieldZero { offset: usize },
    #[error("unsupported wire type {wire_type} at byte {offset}")]
    WireType { wire_type: u8, offset: usize },
    #[error("field {field} has wire type {wire_type}, expected {expected}")]
    FieldWireType {
        field: u32,
        wire_type: u8,
        expected: u8,
    },
    #[error("field {field} is not UTF-8")]
    Utf8 { field: u32 },
}

/// One field's value as it came off the wire.
enum Value<'a> {
    Varint(u64),
    Len(&'a [u8]),
    Fixed,
}

impl Value<'_> {
    fn wire_type(&self) -> u8 {
        match self {
            Value::Varint(_) => WIRE_VARINT,
            Value::Len(_) => WIRE_LEN,
            Value::Fixed => WIRE_FIXED64,
        }
    }
}

/// Reads the fields of one message in order.
struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Fields { buf, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let start = self.pos;
        let mut value = 0u64;
        for i in 0..10 {
            let byte = *self
                .buf
                .get(self.pos)
                .ok_or(DecodeError::Truncated { offset: self.pos })?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::VarintTooLong { offset: start })
    }

    fn take(&mut self, len: u64) -> Result<&'a [u8], DecodeError> {
        let truncated = DecodeError::Truncated { offset: self.pos };
        let len = usize::try_from(len).map_err(|_| truncated.clone())?;
        let end = self.pos.checked_add(len).ok_or(truncated.clone())?;
        let bytes = self.buf.get(self.pos..end).ok_or(truncated)?;
        self.pos = end;
        Ok(bytes)
    }

    /// The next field, or `None` at the end of the message.
    fn next_field(&mut self) -> Result<Option<(u32, Value<'a>)>, DecodeError> {
        if self.pos == self.buf.len() {
            return Ok(None);
        }
        let offset = self.pos;
        let key = self.varint()?;
        let wire_type = (key & 7) as u8;
        let field =
            u32::try_from(key >> 3).map_err(|_| DecodeError::WireType { wire_type, offset })?;
        if field == 0 {
            return Err(DecodeError::FieldZero { offset });
        }
        let value = match wire_type {
            WIRE_VARINT => Value::Varint(self.varint()?),
            WIRE_FIXED64 => {
                self.take(8)?;
                Value::Fixed
            }
            WIRE_LEN => {
                let len = self.varint()?;
                Value::Len(self.take(len)?)
            }
            WIRE_FIXED32 => {
                self.take(4)?;
                Value::Fixed
            }
            _ => return Err(DecodeError::WireType { wire_type, offset }),
        };
        Ok(Some((field, value)))
    }
}

fn len_field(field: u32, value: Value<'_>) -> Result<&[u8], DecodeError> {
    match value {
        Value::Len(bytes) => Ok(bytes),
        other => Err(DecodeError::FieldWireType {
            field,
            wire_type: other.wire_type(),
            expected: WIRE_LEN,
        }),
    }
}

fn string_field(field: u32, value: Value<'_>) -> Result<String, DecodeError> {
    let bytes = len_field(field, value)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Utf8 { field })
}

/// Decodes a `google.protobuf.Any` (type_url = 1, value = 2).
fn decode_any(buf: &[u8]) -> Result<Any, DecodeError> {
    let mut any = Any::new();
    let mut fields = Fields::new(buf);
    while let Some((field, value)) = fields.next_field()? {
        match field {
            1 => any.type_url = string_field(field, value)?,
            2 => any.value = len_field(field, value)?.to_vec(),
            _ => {}
        }
    }
    Ok(any)
}

/// containerd's `BootstrapParams` (2.3+), the fields the shim reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BootstrapParams {
    /// `instance_id` (1): the container or sandbox id, as `-id`.
    pub instance_id: String,
    /// `namespace` (2), as `-namespace`.
    pub namespace: String,
    /// `log_level` (3): 0 info, negative more verbose (-4 debug, -8 trace).
    pub log_level: i32,
    /// `containerd_version` (4).
    pub containerd_version: String,
    /// `containerd_ttrpc_address` (5): where events go (the legacy `TTRPC_ADDRESS`).
    pub ttrpc_address: String,
    /// `containerd_grpc_address` (6): the legacy `-address`, part of the socket name.
    pub grpc_address: String,
    /// `containerd_binary` (7): the legacy `-publish-binary`.
    pub containerd_binary: String,
    /// `extensions` (8), each an `Extension { google.protobuf.Any value = 1 }`.
    pub extensions: Vec<Any>,
    /// `socket_dir` (9, optional): where to put the shim's socket.
    pub socket_dir: Option<String>,
}

impl BootstrapParams {
    /// Decodes the message; unknown fields are skipped.
    pub fn decode(buf: &[u8]) -> Result<BootstrapParams, DecodeError> {
        let mut params = BootstrapParams::default();
        let mut fields = Fields::new(buf);
        while let Some((field, value)) = fields.next_field()? {
            match field {
                1 => params.instance_id = string_field(field, value)?,
                2 => params.namespace = string_field(field, value)?,
                3 => match value {
                    // An int32 enum: negative values are sign-extended to 64 bits.
                    Value::Varint(v) => params.log_level = v as i32,
                    other => {
                        return Err(DecodeError::FieldWireType {
                            field,
                            wire_type: other.wire_type(),
                            expected: WIRE_VARINT,
                        })
                    }
                },
                4 => params.containerd_version = string_field(field, value)?,
                5 => params.ttrpc_address = string_field(field, value)?,
                6 => params.grpc_address = string_field(field, value)?,
                7 => params.containerd_binary = string_field(field, value)?,
                8 => {
                    let mut ext = Fields::new(len_field(field, value)?);
                    let mut any = None;
                    while let Some((f, v)) = ext.next_field()? {
                        if f == 1 {
                            any = Some(decode_any(len_field(f, v)?)?);
                        }
                    }
                    params.extensions.extend(any);
                }
                9 => params.socket_dir = Some(string_field(field, value)?),
                _ => {}
            }
        }
        Ok(params)
    }

    /// Whether containerd runs at debug level or more verbose.
    pub fn debug(&self) -> bool {
        self.log_level <= LOG_LEVEL_DEBUG
    }

    /// The runtime options: the extension whose type is an options message
    /// (`containerd.runc.v1.Options`, CRI's `runtimeoptions.v1.Options`, …).
    pub fn runtime_options(&self) -> Option<&Any> {
        self.extensions
            .iter()
            .find(|any| any.type_url.ends_with(".Options"))
    }
}

/// Why standard input at `start` was not taken as `BootstrapParams`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotBootstrap {
    #[error("standard input is empty")]
    Empty,
    #[error("not a BootstrapParams message: {0}")]
    Malformed(#[source] DecodeError),
    #[error("BootstrapParams for {namespace:?}/{instance_id:?} do not match the flags")]
    Mismatch {
        instance_id: String,
        namespace: String,
    },
}

/// What `start` got on standard input.
#[derive(Debug, Clone, PartialEq)]
pub enum StartInput {
    /// containerd 2.3+.
    Bootstrap(BootstrapParams),
    /// containerd 1.6–2.2: the runtime options, if the input is an `Any` at all.
    Legacy {
        options: Option<Any>,
        why: NotBootstrap,
    },
}

impl StartInput {
    /// Reads standard input's bytes by containerd's rule: `BootstrapParams` when they decode
    /// as one naming this `id` in this `namespace`, else the legacy options `Any`.
    pub fn classify(input: &[u8], id: &str, namespace: &str) -> StartInput {
        let why = if input.is_empty() {
            NotBootstrap::Empty
        } else {
            match BootstrapParams::decode(input) {
                Ok(params) if params.instance_id == id && params.namespace == namespace => {
                    return StartInput::Bootstrap(params)
                }
                Ok(params) => NotBootstrap::Mismatch {
                    instance_id: params.instance_id,
                    namespace: params.namespace,
                },
                Err(e) => NotBootstrap::Malformed(e),
            }
        };
        StartInput::Legacy {
            options: legacy_options(input),
            why,
        }
    }
}

/// The legacy runtime options: an `Any` with a type, or nothing.
pub fn legacy_options(input: &[u8]) -> Option<Any> {
    if input.is_empty() {
        return None;
    }
    Any::parse_from_bytes(input)
        .ok()
        .filter(|any| !any.type_url.is_empty())
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// `BootstrapResult { version: 2, address, protocol: "ttrpc" }`, the answer to
/// `BootstrapParams`.
pub fn encode_result(address: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(address.len() + 16);
    put_varint(&mut out, (1 << 3) | u64::from(WIRE_VARINT));
    put_varint(&mut out, SHIM_VERSION);
    for (field, text) in [(2u64, address), (3, PROTOCOL)] {
        put_varint(&mut out, (field << 3) | u64::from(WIRE_LEN));
        put_varint(&mut out, text.len() as u64);
        out.extend_from_slice(text.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::bootstrap_api;

    /// A message encoded by hand, field by field, per bootstrap.proto.
    #[derive(Default)]
    struct Enc(Vec<u8>);

    impl Enc {
        fn varint(&mut self, mut v: u64) {
            loop {
                let byte = (v & 0x7f) as u8;
                v >>= 7;
                if v == 0 {
                    self.0.push(byte);
                    return;
                }
                self.0.push(byte | 0x80);
            }
        }
        fn bytes(mut self, field: u64, data: &[u8]) -> Self {
            self.varint(field << 3 | 2);
            self.varint(data.len() as u64);
            self.0.extend_from_slice(data);
            self
        }
        fn string(self, field: u64, s: &str) -> Self {
            self.bytes(field, s.as_bytes())
        }
        fn int32(mut self, field: u64, v: i32) -> Self {
            self.varint(field << 3);
            self.varint(v as i64 as u64);
            self
        }
    }

    fn any(type_url: &str, value: &[u8]) -> Vec<u8> {
        Enc::default().string(1, type_url).bytes(2, value).0
    }

    fn runc_options(binary_name: &str) -> Vec<u8> {
        // containerd.runc.v1.Options: binary_name = 6, systemd_cgroup = 9.
        let mut e = Enc::default().string(6, binary_name);
        e.varint(9 << 3);
        e.varint(1);
        e.0
    }

    fn params(id: &str, ns: &str) -> Enc {
        let ext = Enc::default()
            .bytes(
                1,
                &any("containerd.runc.v1.Options", &runc_options("/opt/runc")),
            )
            .0;
        Enc::default()
            .string(1, id)
            .string(2, ns)
            .int32(3, -4)
            .string(4, "v2.3.0")
            .string(5, "unix:///run/containerd/containerd.sock.ttrpc")
            .string(6, "/run/containerd/containerd.sock")
            .string(7, "/usr/bin/containerd")
            .bytes(8, &ext)
            .string(9, "/run/containerd/s")
    }

    #[test]
    fn params_naming_this_shim_are_bootstrap_params() {
        let input = params("c1", "k8s.io").0;
        let StartInput::Bootstrap(p) = StartInput::classify(&input, "c1", "k8s.io") else {
            panic!("not bootstrap params");
        };
        assert_eq!(p.instance_id, "c1");
        assert_eq!(p.namespace, "k8s.io");
        assert_eq!(p.log_level, -4);
        assert!(p.debug());
        assert_eq!(p.containerd_version, "v2.3.0");
        assert_eq!(
            p.ttrpc_address,
            "unix:///run/containerd/containerd.sock.ttrpc"
        );
        assert_eq!(p.grpc_address, "/run/containerd/containerd.sock");
        assert_eq!(p.containerd_binary, "/usr/bin/containerd");
        assert_eq!(p.socket_dir.as_deref(), Some("/run/containerd/s"));
        let opts = p.runtime_options().expect("runtime options");
        assert_eq!(opts.type_url, "containerd.runc.v1.Options");
        let decoded = crate::runc::RuntimeOptions::from_any(Some(opts)).unwrap();
        assert_eq!(decoded.binary_name.as_deref(), Some("/opt/runc"));
        assert!(decoded.systemd_cgroup);
    }

    #[test]
    fn unknown_fields_are_skipped_and_socket_dir_is_optional() {
        let mut e = Enc::default().string(1, "c1").string(2, "default");
        e.varint(20 << 3 | 5); // fixed32
        e.0.extend_from_slice(&[1, 2, 3, 4]);
        e.varint(21 << 3 | 1); // fixed64
        e.0.extend_from_slice(&[0; 8]);
        let e = e.string(22, "future").int32(3, 4);
        let p = BootstrapParams::decode(&e.0).unwrap();
        assert_eq!(p.socket_dir, None);
        assert_eq!(p.log_level, 4);
        assert!(!p.debug());
        assert!(p.extensions.is_empty());
    }

    #[test]
    fn params_for_another_instance_or_namespace_are_legacy() {
        for (id, ns) in [("other", "k8s.io"), ("c1", "default")] {
            let input = params(id, ns).0;
            match StartInput::classify(&input, "c1", "k8s.io") {
                StartInput::Legacy {
                    why: NotBootstrap::Mismatch { .. },
                    ..
                } => {}
                other => panic!("{id}/{ns}: {other:?}"),
            }
        }
    }

    #[test]
    fn legacy_options_any_is_legacy_with_its_options() {
        let input = any("containerd.runc.v1.Options", &runc_options("crun"));
        let StartInput::Legacy { options, why } = StartInput::classify(&input, "c1", "default")
        else {
            panic!("taken as bootstrap params");
        };
        assert!(matches!(why, NotBootstrap::Mismatch { .. }), "{why:?}");
        let options = options.expect("options");
        assert_eq!(options.type_url, "containerd.runc.v1.Options");
        let decoded = crate::runc::RuntimeOptions::from_any(Some(&options)).unwrap();
        assert_eq!(decoded.binary_name.as_deref(), Some("crun"));
    }

    #[test]
    fn empty_input_is_legacy_without_options() {
        assert_eq!(
            StartInput::classify(b"", "c1", "default"),
            StartInput::Legacy {
                options: None,
                why: NotBootstrap::Empty
            }
        );
    }

    #[test]
    fn garbage_is_legacy_without_options() {
        for garbage in [
            &b"\xff\xff\xff"[..],
            b"{\"not\": \"protobuf\"}",
            b"\x0a\x10short",
            &[0x0f],
            &[0xff; 11],
        ] {
            match StartInput::classify(garbage, "c1", "default") {
                StartInput::Legacy {
                    options: None,
                    why: NotBootstrap::Malformed(_),
                } => {}
                other => panic!("{garbage:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_string_field_that_is_not_utf8_is_malformed() {
        let input = Enc::default().bytes(1, &[0xc3, 0x28]).0;
        assert_eq!(
            BootstrapParams::decode(&input),
            Err(DecodeError::Utf8 { field: 1 })
        );
    }

    #[test]
    fn decodes_what_the_generated_message_encodes() {
        let mut p = bootstrap_api::BootstrapParams::new();
        p.instance_id = "sb1".into();
        p.namespace = "k8s.io".into();
        p.log_level = bootstrap_api::LogLevel::LOG_LEVEL_TRACE.into();
        p.containerd_ttrpc_address = "/run/c.sock.ttrpc".into();
        p.containerd_grpc_address = "/run/c.sock".into();
        p.socket_dir = Some(String::new());
        let mut ext = bootstrap_api::Extension::new();
        let mut a = Any::new();
        a.type_url = "containerd.runc.v1.Options".into();
        a.value = runc_options("runc");
        ext.value = Some(a.clone()).into();
        p.extensions.push(ext);
        let decoded = BootstrapParams::decode(&p.write_to_bytes().unwrap()).unwrap();
        assert_eq!(decoded.instance_id, "sb1");
        assert_eq!(decoded.log_level, -8);
        assert!(decoded.debug());
        assert_eq!(decoded.ttrpc_address, "/run/c.sock.ttrpc");
        assert_eq!(decoded.socket_dir.as_deref(), Some(""));
        assert_eq!(decoded.runtime_options(), Some(&a));
    }

    #[test]
    fn the_result_is_a_bootstrap_result() {
        let bytes = encode_result("unix:///run/containerd/s/abc");
        let r = bootstrap_api::BootstrapResult::parse_from_bytes(&bytes).unwrap();
        assert_eq!(r.version, 2);
        assert_eq!(r.address, "unix:///run/containerd/s/abc");
        assert_eq!(r.protocol, "ttrpc");
    }
}

//! The log's two formats. `text`: env_logger's lines, as the README shows
//! them. `json`: one object per line, `time`, `level`, `target` and
//! `message`, then the record's own fields (the close line's: `event`,
//! `listener`, `client`, `via`, `upstream`, bytes each way, `kernel_bytes`,
//! `duration_s`, `end`, and what MQTT and TLS said), for Loki or
//! Elasticsearch to read without a parser of ours. The eBPF program's
//! records (target `proxy_ebpf`) come out the same way.
use std::io::Write as _;

use log::kv::{self, VisitSource};
use serde_json::{Map, Value};

use crate::config::LogFormat;

pub fn init(level: log::LevelFilter, format: LogFormat) {
    let mut b = env_logger::Builder::new();
    // Our own modules (and the kernel program's records) at the configured
    // level; libraries only from warn up, so debug stays readable.
    b.filter_level(level.min(log::LevelFilter::Warn))
        .filter_module("splicer", level)
        .filter_module("proxy_ebpf", level)
        .format_timestamp_millis();
    match format {
        // The text line already says what the fields say.
        LogFormat::Text => b.format_key_values(|_, _| Ok(())),
        LogFormat::Json => b.format(|buf, record| {
            let mut line = Map::new();
            line.insert("time".into(), buf.timestamp_millis().to_string().into());
            line.insert("level".into(), record.level().as_str().into());
            line.insert("target".into(), record.target().into());
            line.insert("message".into(), record.args().to_string().into());
            let _ = record.key_values().visit(&mut Fields(&mut line));
            writeln!(buf, "{}", Value::Object(line))
        }),
    };
    b.init();
}

/// Adds a record's fields to its JSON object: numbers as numbers.
struct Fields<'a>(&'a mut Map<String, Value>);

impl<'kvs> VisitSource<'kvs> for Fields<'_> {
    fn visit_pair(&mut self, key: kv::Key<'kvs>, value: kv::Value<'kvs>) -> Result<(), kv::Error> {
        let v = if let Some(n) = value.to_u64() {
            n.into()
        } else if let Some(n) = value.to_i64() {
            n.into()
        } else if let Some(x) = value.to_f64() {
            x.into()
        } else if let Some(b) = value.to_bool() {
            b.into()
        } else {
            value.to_string().into()
        };
        self.0.insert(key.as_str().to_string(), v);
        Ok(())
    }
}

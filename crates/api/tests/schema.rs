//! The API against its documents: Vigil's OpenAPI document (every documented
//! operation answers as documented; bodies that violate a schema get 400 naming
//! the field) and Firecracker's own description (every Firecracker operation Vigil
//! claims exists, with the same success status, and accepts Firecracker-shaped
//! bodies). These run on the router directly; no socket, no KVM.

use std::path::PathBuf;
use std::sync::{mpsc, Arc};

use serde_json::{json, Map, Value as Json};
use serde_yaml_ng::Value as Yaml;
use vigil_api::api::ROUTES;
use vigil_api::introspect::ROUTES as INTROSPECTION_ROUTES;
use vigil_api::{Api, Response, OPENAPI_YAML};

/// The Firecracker operations Vigil claims to answer as Firecracker does.
const CLAIMED: &[(&str, &str)] = &[
    ("/", "get"),
    ("/version", "get"),
    ("/vm/config", "get"),
    ("/machine-config", "get"),
    ("/machine-config", "put"),
    ("/machine-config", "patch"),
    ("/boot-source", "put"),
    ("/drives/{drive_id}", "put"),
    ("/drives/{drive_id}", "patch"),
    ("/network-interfaces/{iface_id}", "put"),
    ("/network-interfaces/{iface_id}", "patch"),
    ("/vsock", "put"),
    ("/balloon", "get"),
    ("/balloon", "put"),
    ("/balloon", "patch"),
    ("/balloon/statistics", "get"),
    ("/balloon/statistics", "patch"),
    ("/balloon/hinting/start", "patch"),
    ("/balloon/hinting/status", "get"),
    ("/balloon/hinting/stop", "patch"),
    ("/entropy", "put"),
    ("/serial", "put"),
    ("/cpu-config", "put"),
    ("/actions", "put"),
    ("/vm", "patch"),
    ("/snapshot/create", "put"),
    ("/snapshot/load", "put"),
    ("/metrics", "put"),
    ("/logger", "put"),
    ("/mmds", "get"),
    ("/mmds", "put"),
    ("/mmds", "patch"),
    ("/mmds/config", "put"),
];

fn api() -> Arc<Api> {
    // A VMM thread that refuses every start: these tests boot nothing.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        while let Ok(msg) = rx.recv() {
            if let vigil_api::ToVmm::Start { reply, .. } | vigil_api::ToVmm::Restore { reply, .. } =
                msg
            {
                let none = std::io::Error::other("no VMM in this test");
                let _ = reply.send(Err(vigil_api::StartError::Threads(none)));
            }
        }
    });
    Api::new("test".into(), tx, None)
}

fn ours() -> Yaml {
    serde_yaml_ng::from_str(OPENAPI_YAML).expect("openapi.yaml parses")
}

fn firecracker() -> Option<Yaml> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/firecracker-api/firecracker.yaml");
    match std::fs::read_to_string(&path) {
        Ok(text) => Some(serde_yaml_ng::from_str(&text).expect("firecracker.yaml parses")),
        Err(_) => {
            eprintln!("SKIP: {} not found", path.display());
            None
        }
    }
}

fn get<'a>(v: &'a Yaml, key: &str) -> Option<&'a Yaml> {
    v.get(key)
}

/// Follows `$ref` (`#/components/schemas/X` or `#/definitions/X`).
fn resolve<'a>(doc: &'a Yaml, schema: &'a Yaml) -> &'a Yaml {
    match get(schema, "$ref").and_then(Yaml::as_str) {
        Some(r) => {
            let mut node = doc;
            for part in r.trim_start_matches("#/").split('/') {
                node = get(node, part).unwrap_or_else(|| panic!("dangling $ref {r}"));
            }
            resolve(doc, node)
        }
        None => schema,
    }
}

/// A sample value for `schema`: every property (`full`) or only the required ones.
fn sample(doc: &Yaml, schema: &Yaml, full: bool) -> Json {
    sample_named(doc, schema, full, "")
}

/// The same; a string field whose name ends in `path` gets a path that does not
/// exist, so that no test writes files.
fn sample_named(doc: &Yaml, schema: &Yaml, full: bool, name: &str) -> Json {
    let schema = resolve(doc, schema);
    if let Some(first) = get(schema, "enum")
        .and_then(Yaml::as_sequence)
        .and_then(|e| e.first())
    {
        return json!(first.as_str().expect("string enums"));
    }
    match get(schema, "type")
        .and_then(Yaml::as_str)
        .unwrap_or("object")
    {
        "string" if name.ends_with("path") || name.ends_with("path_on_host") => {
            json!("/nonexistent/sample")
        }
        // A documented default is a value the field takes (an address, say).
        "string" => json!(get(schema, "default")
            .and_then(Yaml::as_str)
            .unwrap_or("sample")),
        "integer" => json!(get(schema, "minimum").and_then(Yaml::as_u64).unwrap_or(1)),
        "boolean" => json!(false),
        "array" => json!([sample(doc, get(schema, "items").expect("items"), full)]),
        _ => {
            let required = required(schema);
            let mut out = Map::new();
            if let Some(props) = get(schema, "properties").and_then(Yaml::as_mapping) {
                for (name, prop) in props {
                    let name = name.as_str().expect("property names are strings");
                    if full || required.iter().any(|r| r == name) {
                        out.insert(name.into(), sample_named(doc, prop, full, name));
                    }
                }
            }
            Json::Object(out)
        }
    }
}

fn required(schema: &Yaml) -> Vec<String> {
    get(schema, "required")
        .and_then(Yaml::as_sequence)
        .map(|r| {
            r.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// `(path, method, operation)` for every operation of an OpenAPI or Swagger doc.
fn operations(doc: &Yaml) -> Vec<(String, String, Yaml)> {
    let mut out = Vec::new();
    for (path, item) in get(doc, "paths").and_then(Yaml::as_mapping).expect("paths") {
        for (method, op) in item.as_mapping().expect("path item") {
            let method = method.as_str().unwrap().to_string();
            if ["get", "put", "patch", "post", "delete"].contains(&method.as_str()) {
                out.push((path.as_str().unwrap().to_string(), method, op.clone()));
            }
        }
    }
    out
}

/// Status codes an operation documents (`default` as 0).
fn statuses(op: &Yaml) -> Vec<u16> {
    get(op, "responses")
        .and_then(Yaml::as_mapping)
        .expect("responses")
        .keys()
        .map(|k| match k {
            Yaml::Number(n) => n.as_u64().unwrap() as u16,
            Yaml::String(s) if s == "default" => 0,
            Yaml::String(s) => s.parse().expect("status"),
            other => panic!("status key {other:?}"),
        })
        .collect()
}

fn success(op: &Yaml) -> u16 {
    *statuses(op)
        .iter()
        .find(|s| (200..300).contains(*s))
        .expect("a success status")
}

/// The body schema of an OpenAPI operation.
fn our_body(op: &Yaml) -> Option<&Yaml> {
    get(op, "requestBody")?
        .get("content")?
        .get("application/json")?
        .get("schema")
}

/// The body schema of a Swagger 2 operation.
fn their_body(op: &Yaml) -> Option<&Yaml> {
    get(op, "parameters")?
        .as_sequence()?
        .iter()
        .find(|p| get(p, "in").and_then(Yaml::as_str) == Some("body"))?
        .get("schema")
}

fn concrete(path: &str) -> String {
    path.replace("{drive_id}", "sample")
        .replace("{iface_id}", "sample")
}

fn call(api: &Api, method: &str, path: &str, body: &Json) -> Response {
    let bytes = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    api.handle(&method.to_ascii_uppercase(), path, &bytes)
}

fn fault(r: &Response) -> String {
    let body: Json = serde_json::from_str(r.body.as_deref().expect("an error has a body"))
        .expect("errors are JSON");
    let obj = body.as_object().expect("an object");
    assert_eq!(obj.len(), 1, "only fault_message: {body}");
    obj["fault_message"].as_str().expect("a string").to_string()
}

const SERDE_ERRORS: [&str; 3] = ["unknown field", "missing field", "invalid type"];

#[test]
fn every_documented_operation_answers_as_documented() {
    let doc = ours();
    let api = api();
    for (path, method, op) in operations(&doc) {
        let body = our_body(&op).map_or(Json::Null, |s| sample(&doc, s, true));
        let r = call(&api, &method, &concrete(&path), &body);
        let documented = statuses(&op);
        assert!(
            documented.contains(&r.status) || (r.status >= 400 && documented.contains(&0)),
            "{method} {path}: {} is not documented ({documented:?}): {:?}",
            r.status,
            r.body
        );
        if r.status >= 400 {
            fault(&r);
        }
    }
}

#[test]
fn every_route_is_documented_and_every_documented_path_routed() {
    let doc = ours();
    let documented: Vec<(String, String)> = operations(&doc)
        .into_iter()
        .map(|(p, m, _)| (p, m.to_ascii_uppercase()))
        .collect();
    let routes = || ROUTES.iter().chain(INTROSPECTION_ROUTES);
    for (path, methods) in routes() {
        for method in methods.split(", ") {
            assert!(
                documented.contains(&(path.to_string(), method.to_string())),
                "{method} {path} is served but not documented"
            );
        }
    }
    for (path, method) in &documented {
        let served = routes().any(|(p, m)| p == path && m.split(", ").any(|x| x == method));
        assert!(served, "{method} {path} is documented but not served");
    }
}

#[test]
fn bodies_that_violate_the_schema_get_400_naming_the_field() {
    let doc = ours();
    let api = api();
    for (path, method, op) in operations(&doc) {
        let Some(schema) = our_body(&op) else {
            continue;
        };
        // These answer only with a running VM (see the next test).
        if is_introspection(&path) {
            continue;
        }
        let path = concrete(&path);
        let schema = resolve(&doc, schema);
        let full = sample(&doc, schema, true);

        let body_required = get(&op, "requestBody")
            .and_then(|b| get(b, "required"))
            .and_then(Yaml::as_bool)
            .unwrap_or(false);
        let r = call(&api, &method, &path, &Json::Null);
        if body_required {
            assert_eq!(r.status, 400, "{method} {path} without a body");
            assert!(fault(&r).contains("JSON body"), "{:?}", r.body);
        } else {
            assert!(
                !fault(&r).contains("JSON body"),
                "{method} {path}: {:?}",
                r.body
            );
        }

        let r = api.handle(&method.to_ascii_uppercase(), &path, b"{not json");
        assert_eq!(r.status, 400, "{method} {path} with bad JSON");
        // A free-form object (the MMDS store) takes any member.
        if get(schema, "additionalProperties").and_then(Yaml::as_bool) == Some(true) {
            continue;
        }

        let mut extra = full.clone();
        extra["surprise"] = json!(1);
        let r = call(&api, &method, &path, &extra);
        assert_eq!(r.status, 400, "{method} {path} with an unknown field");
        let m = fault(&r);
        assert!(
            m.contains("unknown field `surprise`"),
            "{method} {path}: {m}"
        );

        for field in required(schema) {
            let mut missing = full.clone();
            missing.as_object_mut().unwrap().remove(&field);
            let r = call(&api, &method, &path, &missing);
            assert_eq!(r.status, 400, "{method} {path} without {field}");
            let m = fault(&r);
            assert!(
                m.contains(&format!("missing field `{field}`")),
                "{method} {path}: {m}"
            );
        }

        let props = get(schema, "properties")
            .and_then(Yaml::as_mapping)
            .cloned()
            .unwrap_or_default();
        for (name, prop) in props {
            let name = name.as_str().unwrap();
            let prop = resolve(&doc, &prop);
            let wrong = match get(prop, "type").and_then(Yaml::as_str) {
                Some("string") => json!(12345),
                _ => json!("not-the-right-type"),
            };
            let mut bad = full.clone();
            bad[name] = wrong.clone();
            let r = call(&api, &method, &path, &bad);
            assert_eq!(r.status, 400, "{method} {path} with {name}={wrong}");
            let m = fault(&r);
            assert!(
                m.contains(&format!("{name}: ")),
                "{method} {path} {name}: {m}"
            );
        }
    }
}

fn is_introspection(path: &str) -> bool {
    INTROSPECTION_ROUTES.iter().any(|(p, _)| *p == path)
}

#[test]
fn introspection_needs_a_running_vm() {
    let doc = ours();
    let api = api();
    let mut seen = 0;
    for (path, method, op) in operations(&doc) {
        if !is_introspection(&path) {
            continue;
        }
        seen += 1;
        // With a valid body, an empty one, and a query: the same answer.
        let body = our_body(&op).map_or(Json::Null, |s| sample(&doc, s, true));
        for (path, body) in [
            (path.clone(), body),
            (path.clone(), Json::Null),
            (format!("{path}?since=3"), Json::Null),
        ] {
            let r = call(&api, &method, &path, &body);
            assert_eq!(r.status, 400, "{method} {path}: {:?}", r.body);
            let m = fault(&r);
            assert!(m.contains("needs a running VM"), "{method} {path}: {m}");
            assert!(statuses(&op).contains(&400), "{method} {path}");
        }
    }
    let routed: usize = INTROSPECTION_ROUTES
        .iter()
        .map(|(_, m)| m.split(", ").count())
        .sum();
    assert_eq!(seen, routed, "every introspection operation is documented");
    // Paths under the prefixes that are not resources get the same answer before
    // the start (the introspection router names them after).
    let r = api.handle("GET", "/vigil/introspect/nothing", b"");
    assert_eq!(r.status, 400);
}

#[test]
fn the_document_is_served() {
    let r = api().handle("GET", "/vigil/openapi.yaml", b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.body.as_deref(), Some(OPENAPI_YAML));
    assert_eq!(
        get(&ours(), "openapi").and_then(Yaml::as_str),
        Some("3.0.3")
    );
}

#[test]
fn firecracker_operations_we_claim_exist_with_the_same_success_status() {
    let Some(fc) = firecracker() else { return };
    let doc = ours();
    let theirs = operations(&fc);
    let mine = operations(&doc);
    let api = api();
    for (path, method) in CLAIMED {
        let (_, _, their_op) = theirs
            .iter()
            .find(|(p, m, _)| p == path && m == method)
            .unwrap_or_else(|| panic!("{method} {path} is not in Firecracker's API"));
        let (_, _, my_op) = mine
            .iter()
            .find(|(p, m, _)| p == path && m == method)
            .unwrap_or_else(|| panic!("{method} {path} is not in Vigil's document"));
        assert_eq!(success(their_op), success(my_op), "{method} {path}");
        let r = api.handle(&method.to_ascii_uppercase(), &concrete(path), b"{}");
        if r.status >= 400 {
            let m = fault(&r);
            assert!(
                !m.contains("no such resource") && !m.contains("not a method"),
                "{method} {path}: {m}"
            );
        }
    }
    // And every non-Vigil operation in our document is a claimed one.
    for (path, method, _) in &mine {
        if !path.starts_with("/vigil/") {
            assert!(
                CLAIMED.contains(&(path.as_str(), method.as_str())),
                "{method} {path} is documented but not claimed as Firecracker's"
            );
        }
    }
}

/// The README's compatibility table: `(method, path, served)` of each row.
fn compatibility_table() -> Vec<(String, String, bool)> {
    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .expect("README.md");
    readme
        .lines()
        .filter_map(|line| {
            let mut cells = line.split('|').map(str::trim).skip(1);
            let op = cells.next()?.strip_prefix('`')?.strip_suffix('`')?;
            let (method, path) = op.split_once(' ')?;
            if !path.starts_with('/') {
                return None;
            }
            let served = match cells.next()? {
                "served" => true,
                "refused" => false,
                other => panic!("{line}: {other:?} is neither served nor refused"),
            };
            Some((method.to_ascii_lowercase(), path.to_string(), served))
        })
        .collect()
}

#[test]
fn the_readme_says_of_every_firecracker_operation_whether_it_is_served() {
    let Some(fc) = firecracker() else { return };
    let table = compatibility_table();
    for (path, method, _) in operations(&fc) {
        let rows = table
            .iter()
            .filter(|(m, p, _)| *m == method && *p == path)
            .count();
        assert_eq!(
            rows, 1,
            "{method} {path}: {rows} rows in the README's table"
        );
    }
    let api = api();
    for (method, path, served) in &table {
        let claimed = CLAIMED.contains(&(path.as_str(), method.as_str()));
        assert_eq!(
            *served, claimed,
            "{method} {path}: the README says served={served}, CLAIMED says {claimed}"
        );
        if !served {
            let r = api.handle(&method.to_ascii_uppercase(), &concrete(path), b"{}");
            assert_eq!(r.status, 400, "{method} {path}");
            let m = fault(&r);
            assert!(
                m.contains("Vigil does not implement this Firecracker resource"),
                "{method} {path}: {m}"
            );
        }
    }
}

#[test]
fn firecracker_shaped_bodies_are_accepted() {
    let Some(fc) = firecracker() else { return };
    let api = api();
    for (path, method) in CLAIMED {
        let (_, _, op) = operations(&fc)
            .into_iter()
            .find(|(p, m, _)| p == path && m == method)
            .unwrap();
        let Some(schema) = their_body(&op) else {
            continue;
        };
        for full in [false, true] {
            let body = sample(&fc, schema, full);
            let r = call(&api, method, &concrete(path), &body);
            if r.status == 204 {
                continue;
            }
            assert_eq!(r.status, 400, "{method} {path} {body}: {:?}", r.body);
            let m = fault(&r);
            assert!(
                !SERDE_ERRORS.iter().any(|e| m.contains(e)),
                "{method} {path}: Firecracker's body {body} does not parse: {m}"
            );
        }
    }
}

#[test]
fn a_firecracker_configuration_sequence_is_accepted_and_shown() {
    let api = api();
    let exe = std::env::current_exe().unwrap().display().to_string();
    let ok = |method: &str, path: &str, body: Json| {
        let r = call(&api, method, path, &body);
        assert_eq!(r.status, 204, "{method} {path} {body}: {:?}", r.body);
    };
    ok(
        "put",
        "/boot-source",
        json!({"kernel_image_path": exe, "boot_args": "console=ttyS0"}),
    );
    ok(
        "put",
        "/machine-config",
        json!({"vcpu_count": 2, "mem_size_mib": 256, "smt": false, "cpu_template": "None", "track_dirty_pages": false, "huge_pages": "None"}),
    );
    ok("patch", "/machine-config", json!({"mem_size_mib": 512}));
    // Firecracker's switch for diff snapshots: Vigil always tracks.
    ok(
        "patch",
        "/machine-config",
        json!({"track_dirty_pages": true}),
    );
    ok(
        "put",
        "/drives/rootfs",
        json!({"drive_id": "rootfs", "path_on_host": exe, "is_root_device": true, "is_read_only": true,
        "rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 1000}, "ops": {"size": 100, "one_time_burst": 50, "refill_time": 1000}}}),
    );
    ok(
        "put",
        "/network-interfaces/eth0",
        json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02"}),
    );
    ok(
        "put",
        "/vsock",
        json!({"guest_cid": 3, "uds_path": "/tmp/v.sock"}),
    );
    ok(
        "put",
        "/balloon",
        json!({"amount_mib": 64, "deflate_on_oom": true, "stats_polling_interval_s": 1}),
    );
    ok("patch", "/balloon", json!({"amount_mib": 32}));
    ok(
        "patch",
        "/balloon/statistics",
        json!({"stats_polling_interval_s": 5}),
    );
    ok("put", "/entropy", json!({}));
    let r = api.handle("GET", "/vm/config", b"");
    let full: Json = serde_json::from_str(r.body.as_deref().unwrap()).unwrap();
    assert_eq!(full["machine-config"]["mem_size_mib"], 512);
    assert_eq!(full["balloon"]["amount_mib"], 32);
    assert_eq!(full["drives"][0]["drive_id"], "rootfs");
    let r = api.handle("GET", "/machine-config", b"");
    assert_eq!(
        serde_json::from_str::<Json>(r.body.as_deref().unwrap()).unwrap()["vcpu_count"],
        2
    );

    // Refusals leave what was configured as it was, and name field and value.
    for (method, path, body, needle) in [
        (
            "put",
            "/machine-config",
            json!({"vcpu_count": 0, "mem_size_mib": 64}),
            "vcpu_count 0",
        ),
        (
            "put",
            "/machine-config",
            json!({"vcpu_count": 2, "mem_size_mib": 64, "smt": true}),
            "smt true",
        ),
        (
            "put",
            "/machine-config",
            json!({"vcpu_count": 2, "mem_size_mib": 16}),
            "amount_mib 32",
        ),
        (
            "put",
            "/drives/x",
            json!({"drive_id": "y", "is_root_device": false, "path_on_host": exe}),
            "drive_id \"y\"",
        ),
        (
            "put",
            "/drives/other",
            json!({"drive_id": "other", "is_root_device": true, "path_on_host": exe}),
            "already is the root device",
        ),
        (
            "put",
            "/drives/d",
            json!({"drive_id": "d", "is_root_device": false, "path_on_host": "/nonexistent"}),
            "path_on_host \"/nonexistent\"",
        ),
        (
            "put",
            "/network-interfaces/eth1",
            json!({"iface_id": "eth1", "host_dev_name": "tap0"}),
            "host_dev_name \"tap0\"",
        ),
        (
            "put",
            "/network-interfaces/eth1",
            json!({"iface_id": "eth1", "host_dev_name": "tap1", "guest_mac": "zz"}),
            "guest_mac \"zz\"",
        ),
        (
            "put",
            "/vsock",
            json!({"guest_cid": 2, "uds_path": "/tmp/v"}),
            "guest_cid 2",
        ),
        (
            "put",
            "/boot-source",
            json!({"kernel_image_path": "/nonexistent/vmlinux"}),
            "kernel_image_path \"/nonexistent/vmlinux\"",
        ),
        (
            "patch",
            "/vm",
            json!({"state": "Paused"}),
            "needs a running VM",
        ),
        (
            "patch",
            "/vm",
            json!({"state": "Sleeping"}),
            "unknown variant `Sleeping`",
        ),
        (
            "put",
            "/actions",
            json!({"action_type": "SendCtrlAltDel"}),
            "needs a running VM",
        ),
        (
            "put",
            "/actions",
            json!({"action_type": "FlushMetrics"}),
            "PUT /metrics",
        ),
        (
            "put",
            "/actions",
            json!({"action_type": "Reboot"}),
            "unknown variant `Reboot`",
        ),
        ("get", "/nowhere", Json::Null, "no such resource"),
        ("put", "/mmds", json!([1]), "a JSON object, not an array"),
        ("patch", "/mmds", json!({"a": 1}), "not initialized"),
        (
            "put",
            "/mmds/config",
            json!({"network_interfaces": ["eth9"]}),
            "network_interfaces \"eth9\"",
        ),
        (
            "put",
            "/mmds/config",
            json!({"network_interfaces": [], "version": "V2"}),
            "network_interfaces []",
        ),
        (
            "put",
            "/mmds/config",
            json!({"network_interfaces": ["eth0"], "version": "V3"}),
            "unknown variant `V3`",
        ),
        ("put", "/pmem/p0", json!({}), "does not implement"),
        (
            "put",
            "/snapshot/create",
            json!({"snapshot_path": "/tmp/s", "mem_file_path": "/tmp/m"}),
            "needs a running VM",
        ),
        (
            "delete",
            "/machine-config",
            Json::Null,
            "accepts GET, PUT, PATCH",
        ),
        (
            "post",
            "/actions",
            json!({"action_type": "InstanceStart"}),
            "accepts PUT",
        ),
    ] {
        let r = call(&api, method, path, &body);
        assert_eq!(r.status, 400, "{method} {path} {body}");
        let m = fault(&r);
        assert!(
            m.contains(needle),
            "{method} {path}: {m:?} lacks {needle:?}"
        );
    }
    let r = api.handle("GET", "/vm/config", b"");
    let after: Json = serde_json::from_str(r.body.as_deref().unwrap()).unwrap();
    assert_eq!(after, full, "refused requests changed the configuration");
}

/// Found by schemathesis (negative_data_rejection, crates/vigil/tests/api_fuzz.rs):
/// the document said `stats_polling_interval_s` is at least 1, while 0 is what a
/// balloon without statistics has, and PATCH takes it: the document says so now.
/// Turning statistics on or off by PATCH is refused, as in Firecracker.
#[test]
fn balloon_statistics_intervals_as_documented() {
    let doc = ours();
    let update = resolve(
        &doc,
        get(
            get(get(&doc, "components").unwrap(), "schemas").unwrap(),
            "BalloonStatsUpdate",
        )
        .unwrap(),
    );
    let interval = get(
        get(update, "properties").unwrap(),
        "stats_polling_interval_s",
    )
    .unwrap();
    assert_eq!(get(interval, "minimum").and_then(Yaml::as_u64), Some(0));

    let api = api();
    let patch = |seconds: u64| {
        call(
            &api,
            "patch",
            "/balloon/statistics",
            &json!({ "stats_polling_interval_s": seconds }),
        )
    };
    let r = call(
        &api,
        "put",
        "/balloon",
        &json!({"amount_mib": 0, "deflate_on_oom": false}),
    );
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(patch(0).status, 204);
    let r = patch(5);
    assert_eq!(r.status, 400);
    assert!(
        fault(&r).contains("statistics were turned off by PUT /balloon"),
        "{r:?}"
    );
    let r = call(
        &api,
        "put",
        "/balloon",
        &json!({"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1}),
    );
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(patch(5).status, 204);
    assert!(fault(&patch(0)).contains("turned on"));
}

#[test]
fn mmds_store_takes_put_patch_and_holds_its_limit() {
    let api = api();
    let get = |api: &Api| -> Json {
        let r = api.handle("GET", "/mmds", b"");
        assert_eq!(r.status, 200);
        serde_json::from_str(r.body.as_deref().unwrap()).unwrap()
    };
    assert_eq!(get(&api), json!({}));
    let r = call(
        &api,
        "put",
        "/mmds",
        &json!({"latest": {"a": "1", "b": "2"}}),
    );
    assert_eq!(r.status, 204, "{:?}", r.body);
    let r = call(
        &api,
        "patch",
        "/mmds",
        &json!({"latest": {"a": null, "c": "3"}}),
    );
    assert_eq!(r.status, 204, "{:?}", r.body);
    assert_eq!(get(&api), json!({"latest": {"b": "2", "c": "3"}}));

    api.mmds().set_size_limit(40);
    let r = call(
        &api,
        "patch",
        "/mmds",
        &json!({"latest": {"d": "x".repeat(40)}}),
    );
    assert_eq!(r.status, 400);
    assert!(
        fault(&r).contains("over its limit of 40 bytes"),
        "{}",
        fault(&r)
    );
    assert_eq!(get(&api), json!({"latest": {"b": "2", "c": "3"}}));

    // /mmds/config names interfaces already configured.
    let r = call(
        &api,
        "put",
        "/network-interfaces/eth0",
        &json!({"iface_id": "eth0", "host_dev_name": "vgmmds0"}),
    );
    assert_eq!(r.status, 204, "{:?}", r.body);
    let r = call(
        &api,
        "put",
        "/mmds/config",
        &json!({"network_interfaces": ["eth0"], "ipv4_address": "169.254.0.0"}),
    );
    assert!(
        fault(&r).starts_with("PUT /mmds/config: ipv4_address 169.254.0.0"),
        "{}",
        fault(&r)
    );
    let r = call(
        &api,
        "put",
        "/mmds/config",
        &json!({"network_interfaces": ["eth0"], "version": "V2"}),
    );
    assert_eq!(r.status, 204, "{:?}", r.body);
    let r = api.handle("GET", "/vm/config", b"");
    let full: Json = serde_json::from_str(r.body.as_deref().unwrap()).unwrap();
    assert_eq!(full["mmds-config"]["version"], "V2", "{full}");
    assert_eq!(
        full["mmds-config"]["ipv4_address"], "169.254.169.254",
        "{full}"
    );
}

//! `vmm bench` through the binary: the JSON names every path with the
//! documented shape, and `--svg` writes an SVG. Timings are not asserted.

mod common;

use serde_json::Value;

/// A small run (seconds, not minutes) writing JSON and optionally SVG.
fn bench(dir: &str, svg: bool) -> (Value, std::path::PathBuf, String) {
    let dir = common::scratch(dir);
    let json = dir.join("bench.json");
    let svg_path = dir.join("bench.svg");
    let mut args = vec![
        "bench".to_string(),
        "--iters".into(),
        "50".into(),
        "--runs".into(),
        "1".into(),
        "--json".into(),
        json.display().to_string(),
    ];
    if svg {
        args.push("--svg".into());
        args.push(svg_path.display().to_string());
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = common::vmm(&argv);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        common::status(&out),
        0,
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&json).expect("the JSON file");
    let v: Value = serde_json::from_str(&text).expect("valid JSON");
    (v, svg_path, stdout)
}

#[test]
fn json_names_every_path_with_its_floor() {
    let (v, _, stdout) = bench("json", false);
    assert!(v["machine"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert_eq!(v["iters"], 50);
    assert_eq!(v["runs"], 1);
    let paths = v["paths"].as_array().expect("paths array");
    let names: Vec<&str> = paths.iter().filter_map(|p| p["name"].as_str()).collect();
    let expected = [
        ("floor-pio", None),
        ("same-image-pio", None),
        ("pio", Some("floor-pio")),
        ("floor-mmio", None),
        ("same-image-mmio", None),
        ("mmio", Some("floor-mmio")),
        ("floor-emul", None),
        ("emul-gpr", Some("floor-emul")),
        ("floor-emul-reg", None),
        ("emul-reg", Some("floor-emul-reg")),
        ("floor-emulx", None),
        ("emul-vec", Some("floor-emulx")),
        ("emul-vec-nonzero", Some("floor-emulx")),
        ("emul-xsave", Some("floor-emulx")),
        ("emul-xrstor", Some("floor-emulx")),
        ("floor-user-mmio", None),
        ("same-image-user-mmio", None),
        ("user-mmio", Some("floor-user-mmio")),
        ("floor-user-emul", None),
        ("user-emul", Some("floor-user-emul")),
        ("simd-cpl0", None),
        ("in-kernel", None),
        ("host-emul", None),
    ];
    assert_eq!(
        names,
        expected.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        "{v}"
    );
    for (p, (name, floor)) in paths.iter().zip(expected) {
        let obj = p.as_object().expect("a path is an object");
        for key in [
            "name",
            "floor",
            "median_ns",
            "p99_ns",
            "floor_median_ns",
            "ratio",
        ] {
            assert!(obj.contains_key(key), "{name} lacks {key}: {p}");
        }
        assert_eq!(p["floor"].as_str(), floor, "{p}");
        let failed = obj.contains_key("error");
        if failed {
            assert!(p["error"].is_string(), "{p}");
            assert!(p["median_ns"].is_null() && p["p99_ns"].is_null(), "{p}");
        } else {
            assert!(p["median_ns"].is_u64() && p["p99_ns"].is_u64(), "{p}");
        }
        match floor {
            None => {
                assert!(
                    p["ratio"].is_null() && p["floor_median_ns"].is_null(),
                    "{p}"
                );
            }
            Some(f) => {
                let floor_entry = paths.iter().find(|q| q["name"] == f).expect("floor entry");
                let both_ok = !failed && floor_entry.get("error").is_none();
                assert_eq!(p["ratio"].is_f64(), both_ok, "{p}");
                assert_eq!(p["floor_median_ns"], floor_entry["median_ns"], "{p}");
            }
        }
        // pio, mmio and user-mmio are also compared with the bare loop
        // over the VMM's own set-up of the same image.
        let same = ["pio", "mmio", "user-mmio"].contains(&name);
        assert_eq!(obj.contains_key("same_image_floor"), same, "{p}");
        if same {
            let f = format!("same-image-{name}");
            assert_eq!(p["same_image_floor"].as_str(), Some(f.as_str()), "{p}");
            let floor_entry = paths
                .iter()
                .find(|q| q["name"] == f.as_str())
                .expect("entry");
            assert_eq!(p["same_image_median_ns"], floor_entry["median_ns"], "{p}");
            assert!(p["same_image_ratio"].is_f64(), "{p}");
        }
        if name == "simd-cpl0" && !failed {
            assert!(p["per_second"].is_number(), "{p}");
        }
        assert!(stdout.contains(name), "table lacks {name}:\n{stdout}");
    }
    // Paths the VMM serves without its emulator always work.
    for name in [
        "floor-pio",
        "same-image-pio",
        "pio",
        "floor-mmio",
        "same-image-mmio",
        "mmio",
        "in-kernel",
    ] {
        let p = paths.iter().find(|p| p["name"] == name).expect("path");
        assert!(p.get("error").is_none(), "{p}");
    }
}

#[test]
fn svg_is_written() {
    let (_, svg, _) = bench("svg", true);
    let text = std::fs::read_to_string(&svg).expect("the SVG file");
    assert!(text.contains("<svg"), "{text}");
    assert!(text.trim_end().ends_with("</svg>"), "{text}");
    assert!(text.contains("floor-pio") && text.contains("pio"), "{text}");
}

#[test]
fn zero_iterations_are_refused() {
    let out = common::vmm(&["bench", "--iters", "0"]);
    assert_eq!(common::status(&out), 2);
}

/// `--only` runs the groups holding the named paths (their floors come
/// along) and nothing else; an unknown name is an error that names it.
#[test]
fn only_runs_the_named_paths_groups() {
    let dir = common::scratch("only");
    let json = dir.join("bench.json");
    let json_arg = json.display().to_string();
    let argv = [
        "bench",
        "--iters",
        "50",
        "--runs",
        "1",
        "--only",
        "pio,in-kernel",
        "--json",
        &json_arg,
    ];
    let out = common::vmm(&argv);
    assert_eq!(
        common::status(&out),
        0,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let names: Vec<&str> = v["paths"]
        .as_array()
        .expect("paths array")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["floor-pio", "same-image-pio", "pio", "in-kernel"]);

    let out = common::vmm(&["bench", "--only", "pio,no-such-path"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(common::status(&out), 0, "{stderr}");
    assert!(stderr.contains("\"no-such-path\""), "{stderr}");
}

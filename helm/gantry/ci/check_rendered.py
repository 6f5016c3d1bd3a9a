#!/usr/bin/env python3
"""Checks on `helm template` output that a schema cannot make; run by
scripts/check-chart.sh (which also runs kubernetes-validate on the output).

  check_rendered.py split RENDERED K8S_OUT CRD_OUT
      Splits a render: Prometheus Operator objects (not in the Kubernetes
      schemas kubernetes-validate knows) go to CRD_OUT, the rest to K8S_OUT.
  check_rendered.py case NAME RENDERED SHELL
      Checks one rendered case (default, full, existing-secrets): the
      StatefulSet, Services, PDB, Secrets, worker, ServiceMonitor fit
      together, and the start-up script *as shipped in the ConfigMap*, run
      with the container's env and args for every pod, prints the expected
      `gantry serve` command line.
  check_rendered.py same-pod-template RENDERED_A RENDERED_B
      The StatefulSet's pod template is the same in both (replicaCount must
      not change it: scaling would restart every pod).
  check_rendered.py values-documented VALUES README
      Every value in values.yaml is named in the README.
"""

import os
import subprocess
import sys
import tempfile

import yaml

CHART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

CASES = {
    "default": dict(domain="cluster.local", bootstrap=3, replicas=3, tls=False, client_auth=False,
                    auth=False, service_monitor=False, worker=False, anti_affinity="soft", persistence=True),
    "full": dict(domain="cluster.example", bootstrap=3, replicas=5, tls=True, client_auth=True,
                 auth=True, service_monitor=True, worker=True, anti_affinity="hard", persistence=True),
    "existing-secrets": dict(domain="cluster.local", bootstrap=1, replicas=1, tls=True, client_auth=False,
                             auth=True, service_monitor=False, worker=True, anti_affinity="none",
                             persistence=False, scale_down_hook=False),
}

failures = []


def check(condition, message):
    if not condition:
        failures.append(message)
    return condition


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def one(docs, kind, where=lambda d: True):
    found = [d for d in docs if d.get("kind") == kind and where(d)]
    if len(found) != 1:
        raise SystemExit(f"expected exactly one {kind}, found {len(found)}")
    return found[0]


def split(rendered, k8s_out, crd_out):
    docs = load(rendered)
    crds = [d for d in docs if d.get("apiVersion", "").startswith("monitoring.coreos.com/")]
    rest = [d for d in docs if d not in crds]
    for path, part in ((k8s_out, rest), (crd_out, crds)):
        with open(path, "w") as f:
            yaml.safe_dump_all(part, f, sort_keys=False)
    print(f"{len(rest)} Kubernetes objects, {len(crds)} Prometheus Operator objects")


def check_security(where, pod_spec, container):
    check(pod_spec.get("enableServiceLinks") is False, f"{where}: enableServiceLinks must be false")
    check(pod_spec.get("automountServiceAccountToken") is False, f"{where}: no service account token")
    pod_sc = pod_spec.get("securityContext", {})
    check(pod_sc.get("runAsNonRoot") is True, f"{where}: pod runAsNonRoot")
    sc = container.get("securityContext", {})
    check(sc.get("runAsNonRoot") is True, f"{where}: container runAsNonRoot")
    check(sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem")
    check(sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation false")
    check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: drop ALL capabilities")
    check(sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: seccomp RuntimeDefault")
    check(any(m["mountPath"] == "/tmp" for m in container.get("volumeMounts", [])), f"{where}: writable /tmp")


def mounted_files(pod_spec, container):
    """Paths of the files a container sees from Secret and ConfigMap volumes."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    files = set()
    for m in container.get("volumeMounts", []):
        v = volumes.get(m["name"], {})
        sources = [v.get("secret") or v.get("configMap") or {}]
        sources += [s.get("secret") or s.get("configMap") or {} for s in v.get("projected", {}).get("sources", [])]
        for source in sources:
            for item in source.get("items", []):
                files.add(f"{m['mountPath']}/{item['path']}")
    return files


def projected_secret_of(pod_spec, container, path):
    """The Secret a mounted file comes from, or None."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for m in container.get("volumeMounts", []):
        v = volumes.get(m["name"], {})
        if "secret" in v:
            secrets = [(v["secret"].get("secretName"), v["secret"])]
        else:
            secrets = [(s["secret"].get("name"), s["secret"]) for s in v.get("projected", {}).get("sources", [])
                       if "secret" in s]
        for name, secret in secrets:
            for item in secret.get("items", []):
                if f"{m['mountPath']}/{item['path']}" == path:
                    return name, item["key"]
    return None


def sts_tls_secret(pod_spec):
    """Name of the Secret the brokers' certificate comes from."""
    return next((v["secret"]["secretName"] for v in pod_spec.get("volumes", []) if v["name"] == "tls"), None)


def secret_keys(docs, name):
    """Keys of a Secret the chart made, or None when it comes from elsewhere."""
    found = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == name]
    return set(found[0].get("data", {})) if found else None


def case(name, rendered, shell):
    want = CASES[name]
    docs = load(rendered)
    sts = one(docs, "StatefulSet")
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    broker = pod["containers"][0]
    ns = sts["metadata"]["namespace"]
    sts_name = sts["metadata"]["name"]
    selector = spec["selector"]["matchLabels"]

    def selects_brokers(d):
        return d.get("spec", {}).get("selector") == selector

    check(spec["podManagementPolicy"] == "Parallel", "podManagementPolicy must be Parallel")
    check(spec["replicas"] == want["replicas"], f"replicas {spec['replicas']} != {want['replicas']}")
    check(spec["updateStrategy"]["type"] == "RollingUpdate", "RollingUpdate")
    check(all(spec["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items()),
          "the pod template carries the selector's labels")
    check_security("broker", pod, broker)

    headless = one(docs, "Service", lambda d: d["metadata"]["name"] == spec["serviceName"])
    check(headless["spec"].get("clusterIP") == "None", "headless Service: clusterIP None")
    check(headless["spec"].get("publishNotReadyAddresses") is True, "headless Service: publishNotReadyAddresses")
    check(selects_brokers(headless), "headless Service selects the broker pods")
    client = one(docs, "Service", lambda d: d.get("spec", {}).get("clusterIP") != "None" and selects_brokers(d))
    check(not client["spec"].get("publishNotReadyAddresses"), "client Service: ready pods only")
    port_of = {p["name"]: p["port"] for p in headless["spec"]["ports"]}
    container_ports = {p["name"]: p["containerPort"] for p in broker["ports"]}
    check(port_of == container_ports, f"headless Service ports {port_of} != container ports {container_ports}")
    check([p["targetPort"] for p in client["spec"]["ports"]] == ["grpc"], "client Service: the gRPC port only")
    cp, pp, mp = port_of["grpc"], port_of["peer"], port_of["metrics"]

    # Probes: gRPC health on the client port; HTTP on metrics with TLS on.
    for probe_name, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                             ("readinessProbe", "/readyz")):
        probe = broker.get(probe_name)
        if not check(probe is not None, f"{probe_name} missing"):
            continue
        if want["tls"]:
            check(probe.get("httpGet") == {"path": path, "port": "metrics"}, f"{probe_name}: HTTP {path} on metrics")
        else:
            check(probe.get("grpc", {}).get("port") == cp, f"{probe_name}: gRPC on {cp}")
    if not want["tls"]:
        check(broker["readinessProbe"]["grpc"].get("service") == "gantry.v1.Jobs", "readiness: gantry.v1.Jobs")
        check("service" not in broker["livenessProbe"]["grpc"], "liveness: overall server health")

    # PDB
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    if want["replicas"] > 1:
        check(len(pdbs) == 1 and pdbs[0]["spec"].get("maxUnavailable") == 1
              and pdbs[0]["spec"]["selector"]["matchLabels"] == selector, "PDB: maxUnavailable 1 over the brokers")

    # Anti-affinity
    anti = pod.get("affinity", {}).get("podAntiAffinity", {})
    kind = ("hard" if "requiredDuringSchedulingIgnoredDuringExecution" in anti
            else "soft" if "preferredDuringSchedulingIgnoredDuringExecution" in anti else "none")
    check(kind == want["anti_affinity"], f"anti-affinity {kind}, expected {want['anti_affinity']}")

    # Storage
    mounts = {m["mountPath"]: m["name"] for m in broker["volumeMounts"]}
    check(mounts.get("/data") == "data", "/data mounted")
    claims = [c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])]
    check(claims == (["data"] if want["persistence"] else []), f"volumeClaimTemplates {claims}")
    if want["persistence"]:
        check(spec.get("persistentVolumeClaimRetentionPolicy", {}).get("whenScaled") == "Delete", "whenScaled Delete")

    # The start-up script as shipped, and how the container runs it.
    script_cm = one(docs, "ConfigMap", lambda d: "gantry-start.sh" in d.get("data", {}))
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "files", "gantry-start.sh")) as f:
        check(script_cm["data"]["gantry-start.sh"].rstrip("\n") == f.read().rstrip("\n"),
              "the ConfigMap holds files/gantry-start.sh unchanged")
    check(broker["command"][0] == "/bin/sh" and broker["command"][1].endswith("/gantry-start.sh"),
          f"command {broker['command']}")
    script_volumes = [v["name"] for v in pod["volumes"]
                      if v.get("configMap", {}).get("name") == script_cm["metadata"]["name"]]
    check([m["mountPath"] for m in broker["volumeMounts"] if m["name"] in script_volumes]
          == [os.path.dirname(broker["command"][1])], "the script's ConfigMap is mounted where the command runs it")

    args = broker.get("args", [])
    files = mounted_files(pod, broker)
    for a in args:
        if a.startswith("/etc/gantry/"):
            check(a in files, f"argument {a} names a file that is not mounted (mounted: {sorted(files)})")
    tls_flags = ["--tls-cert", "--tls-key", "--peer-tls-cert", "--peer-tls-key", "--peer-tls-ca"]
    check(all((f in args) == want["tls"] for f in tls_flags), f"TLS flags should be {want['tls']}: {args}")
    check(("--tls-client-ca" in args) == want["client_auth"], "--tls-client-ca only with clientAuth")
    check(("--token-file" in args) == want["auth"], "--token-file only with auth")
    secret_volumes = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    check(set(secret_volumes) == {n for n in ("auth", "tls") if want[n]},
          f"Secret volumes {sorted(secret_volumes)}")
    if "auth" in secret_volumes:
        keys = secret_keys(docs, secret_volumes["auth"]["secretName"])
        check(keys is None or {i["key"] for i in secret_volumes["auth"]["items"]} <= keys,
              "the token file's key is in the Secret")
    if "tls" in secret_volumes:
        keys = secret_keys(docs, secret_volumes["tls"]["secretName"])
        check(keys is None or keys == {"tls.crt", "tls.key", "ca.crt"}, f"TLS Secret keys {keys}")

    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "gantry-start.sh")
        with open(script, "w") as f:
            f.write(script_cm["data"]["gantry-start.sh"])
        for ordinal in range(want["replicas"]):
            pod_name = f"{sts_name}-{ordinal}"
            env = {"PATH": os.environ["PATH"], "DRY_RUN": "1"}
            for e in broker["env"]:
                if "value" in e:
                    env[e["name"]] = e["value"]
                elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
                    env[e["name"]] = pod_name
                elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
                    env[e["name"]] = ns
            run = subprocess.run([shell, script, *args], env=env, capture_output=True, text=True)
            if not check(run.returncode == 0, f"{pod_name}: the script failed: {run.stderr}"):
                continue

            def host(o):
                return f"{sts_name}-{o}.{spec['serviceName']}.{ns}.svc.{want['domain']}"

            expected = ["gantry", "serve", "--node-id", str(ordinal + 1), "--data-dir", "/data",
                        "--listen", f"0.0.0.0:{cp}", "--peer-listen", f"0.0.0.0:{pp}",
                        "--advertise", f"{host(ordinal)}:{cp}", "--peer-advertise", f"{host(ordinal)}:{pp}"]
            if ordinal < want["bootstrap"]:
                members = ",".join(f"{o + 1}={host(o)}:{pp}" for o in range(want["bootstrap"]))
                expected += ["--initial-cluster", members]
            else:
                expected += ["--join", f"{client['metadata']['name']}.{ns}.svc.{want['domain']}:{cp}"]
            expected += ["--metrics-listen", f"0.0.0.0:{mp}", *args]
            actual = run.stdout.strip()
            check(actual == " ".join(expected),
                  f"{pod_name}: command line\n  expected: {' '.join(expected)}\n  actual:   {actual}")

    # Worker
    workers = [d for d in docs if d["kind"] == "Deployment"]
    check(len(workers) == int(want["worker"]), f"{len(workers)} worker Deployments")
    for w in workers:
        wpod = w["spec"]["template"]["spec"]
        c = wpod["containers"][0]
        check_security("worker", wpod, c)
        check(not selects_brokers(w), "the worker's selector is not the brokers'")
        check(w["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, "worker maxUnavailable 0")
        check(any("echo_worker" in part for part in c["command"]), "the worker runs echo_worker")
        env = {e["name"]: e for e in c["env"]}
        scheme = "https://" if want["tls"] else ""
        addr = f"{scheme}{client['metadata']['name']}.{ns}.svc.{want['domain']}:{cp}"
        check(env["GANTRY_ADDR"].get("value") == addr, f"GANTRY_ADDR {env['GANTRY_ADDR']} != {addr}")
        check(env["GANTRY_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", "worker id")
        check(("GANTRY_TOKEN" in env) == want["auth"], "GANTRY_TOKEN only with auth")
        if want["auth"]:
            ref = env["GANTRY_TOKEN"]["valueFrom"]["secretKeyRef"]
            keys = secret_keys(docs, ref["name"])
            check(keys is None or ref["key"] in keys, f"the worker's token key {ref['key']} is in the Secret")
        check(("GANTRY_TLS_CA" in env) == want["tls"], "GANTRY_TLS_CA only with TLS")
        if want["tls"]:
            check(env["GANTRY_TLS_CA"]["value"] in mounted_files(wpod, c), "the worker's CA file is mounted")
        # Brokers that ask for client certificates get the worker's own.
        for var in ("GANTRY_TLS_CLIENT_CERT", "GANTRY_TLS_CLIENT_KEY"):
            check((var in env) == want["client_auth"], f"{var} only with tls.clientAuth")
            if var in env:
                origin = projected_secret_of(wpod, c, env[var]["value"])
                check(origin is not None, f"{var} {env[var]['value']} is mounted from a Secret")
                if origin:
                    keys = secret_keys(docs, origin[0])
                    check(keys is None or origin[1] in keys, f"{var}: key {origin[1]} is in Secret {origin[0]}")
                    check(origin[0] != sts_tls_secret(pod), f"{var} is not the brokers' own certificate")

    # The scale-down hook: removes nodes above replicaCount before the StatefulSet shrinks.
    jobs = [d for d in docs if d["kind"] == "Job"]
    check(len(jobs) == int(want.get("scale_down_hook", True)), f"{len(jobs)} scale-down hook Jobs")
    for job in jobs:
        annotations = job["metadata"].get("annotations", {})
        check(set(annotations.get("helm.sh/hook", "").split(",")) == {"pre-upgrade", "pre-rollback"},
              f"hook phases: {annotations.get('helm.sh/hook')}")
        jpod = job["spec"]["template"]["spec"]
        c = jpod["containers"][0]
        check_security("scale-down hook", jpod, c)
        check(jpod["restartPolicy"] == "Never", "hook restartPolicy Never")
        script = open(os.path.join(CHART, "files", "gantry-scale-down.sh")).read()
        check(c["command"][:3] == ["/bin/sh", "-c", script], "the hook runs files/gantry-scale-down.sh as shipped")
        env = {e["name"]: e.get("value") for e in c["env"]}
        check(env.get("REPLICAS") == str(want["replicas"]), f"hook REPLICAS {env.get('REPLICAS')}")
        scheme = "https://" if want["tls"] else ""
        check(env.get("CLIENT_ADDR") == f"{scheme}{client['metadata']['name']}.{ns}.svc.{want['domain']}:{cp}",
              f"hook CLIENT_ADDR {env.get('CLIENT_ADDR')}")
        files = mounted_files(jpod, c)
        check(("TOKEN_FILE" in env) == want["auth"], "hook TOKEN_FILE only with auth")
        if want["auth"]:
            check(env["TOKEN_FILE"] in files, f"hook token file {env['TOKEN_FILE']} is mounted")
        args = c["command"][4:]
        check(("--tls-ca" in args) == want["tls"], "hook TLS flags only with TLS")
        for flag in ("--tls-ca", "--tls-cert", "--tls-key"):
            if flag in args:
                check(args[args.index(flag) + 1] in files, f"hook {flag} file is mounted")

    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    check(len(monitors) == int(want["service_monitor"]), f"{len(monitors)} ServiceMonitors")
    for m in monitors:
        check_service_monitor(m, docs)


def check_service_monitor(m, docs):
    """What a ServiceMonitor schema would check, and that it finds the metrics."""
    check(m.get("apiVersion") == "monitoring.coreos.com/v1", "ServiceMonitor apiVersion")
    s = m.get("spec", {})
    allowed = {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels", "podTargetLabels",
               "sampleLimit", "targetLimit"}
    check(set(s) <= allowed, f"ServiceMonitor: unknown spec fields {set(s) - allowed}")
    want_labels = s.get("selector", {}).get("matchLabels", {})
    ns = s.get("namespaceSelector", {}).get("matchNames", [])
    services = [d for d in docs if d["kind"] == "Service" and d["metadata"]["namespace"] in ns
                and all(d["metadata"].get("labels", {}).get(k) == v for k, v in want_labels.items())]
    if not check(len(services) == 1 and services[0]["spec"].get("clusterIP") == "None",
                 f"ServiceMonitor must select the headless Service only, selects {[d['metadata']['name'] for d in services]}"):
        return
    ports = {p["name"] for p in services[0]["spec"]["ports"]}
    endpoint_fields = {"port", "path", "scheme", "interval", "scrapeTimeout", "relabelings", "metricRelabelings",
                       "honorLabels", "tlsConfig", "bearerTokenSecret", "params"}
    for e in s.get("endpoints", []):
        check(set(e) <= endpoint_fields, f"ServiceMonitor endpoint: unknown fields {set(e) - endpoint_fields}")
        check(e.get("port") in ports, f"ServiceMonitor endpoint port {e.get('port')} not in {ports}")
        check(e.get("path") == "/metrics", "ServiceMonitor path /metrics")
        for r in e.get("relabelings", []) + e.get("metricRelabelings", []):
            check(isinstance(r, dict) and set(r) <= {"sourceLabels", "separator", "targetLabel", "regex", "modulus",
                                                     "replacement", "action"}, f"relabeling {r}")
    check(len(s.get("endpoints", [])) >= 1, "ServiceMonitor has an endpoint")


def same_pod_template(a, b):
    ta = one(load(a), "StatefulSet")["spec"]["template"]
    tb = one(load(b), "StatefulSet")["spec"]["template"]
    check(ta == tb, "the StatefulSet's pod template changes with replicaCount: scaling would restart every pod")


def values_documented(values_path, readme_path):
    with open(values_path) as f:
        values = yaml.safe_load(f)
    with open(readme_path) as f:
        readme = f.read()

    # Kubernetes objects passed through whole: documented as one value.
    whole = {"resources", "podSecurityContext", "securityContext", "worker.resources"}

    def leaves(node, path):
        if isinstance(node, dict) and node and path not in whole:
            for k, v in node.items():
                yield from leaves(v, f"{path}.{k}" if path else k)
        else:
            yield path

    for key in leaves(values, ""):
        check(f"`{key}`" in readme, f"README.md does not document `{key}`")


def main():
    command, *rest = sys.argv[1:]
    {"split": split, "case": case, "same-pod-template": same_pod_template,
     "values-documented": values_documented}[command](*rest)
    if failures:
        for f in failures:
            print(f"FAIL: {f}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

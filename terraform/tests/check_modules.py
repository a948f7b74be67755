#!/usr/bin/env python3
"""The properties the Terraform modules promise (issue 15), checked on their HCL.

Usage: check_modules.py [--root REPO]          every check; exit 1 when one fails
       check_modules.py [--root REPO] --mutations
                                               each mutation of MUTATIONS (a copy of the tree with
                                               one property broken) must make its check fail;
                                               exit 1 when one goes unnoticed

No provider is needed: tfmodel.py reads the modules with python-hcl2 and evaluates what is knowable
before an apply (variables' defaults, locals, literals); references to what only an apply knows are
bound to test values (an account id, a region, three availability zones) or stay references, and
the checks compare those references too (the controller's NFS comes from the controller's group).
"""

import argparse
import json
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

from tfmodel import EvalError, Ref, is_known, lifecycle_ignores, load_module

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = HERE.parent.parent

ACCOUNT, REGION = "123456789012", "us-east-1"
COMMON_REFS = {
    "data.aws_caller_identity.current.account_id": ACCOUNT,
    "data.aws_region.current.name": REGION,
    "data.aws_partition.current.partition": "aws",
    "data.aws_availability_zones.available.names": ["us-east-1a", "us-east-1b", "us-east-1c", "us-east-1d"],
}
# What a user must give the controller module (no defaults).
CONTROLLER_VALUES = {
    "allowed_cidrs": ["203.0.113.0/24"],
    "certificate_arn": f"arn:aws:acm:{REGION}:{ACCOUNT}:certificate/test",
}
MODERN_TLS_POLICIES = {
    "ELBSecurityPolicy-TLS13-1-2-2021-06",
    "ELBSecurityPolicy-TLS13-1-2-Res-2021-06",
    "ELBSecurityPolicy-TLS13-1-3-2021-06",
    "ELBSecurityPolicy-TLS13-1-2-FIPS-2023-04",
    "ELBSecurityPolicy-TLS13-1-2-Res-FIPS-2023-04",
    "ELBSecurityPolicy-TLS13-1-3-FIPS-2023-04",
}
# A roll's downtime bound the health check may add once Jenkins answers (healthy_threshold x interval).
MAX_HEALTHY_SECONDS = 30


class Failure(Exception):
    pass


def expect(cond, msg):
    if not cond:
        raise Failure(msg)


CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


class Tree:
    """The modules of one repository checkout."""

    def __init__(self, root):
        self.root = Path(root)
        self.tf = self.root / "terraform"
        self._mods = {}

    def mod(self, name):
        if name not in self._mods:
            path = self.tf / "examples" / "complete" if name == "example" else self.tf / "modules" / name
            self._mods[name] = load_module(path)
        return self._mods[name]

    def ev(self, name, values=None, refs=None):
        return self.mod(name).evaluator(values or {}, dict(COMMON_REFS, **(refs or {})))


def sg_rules(m, ev, rtype, group):
    """The rules of type rtype (aws_vpc_security_group_{ingress,egress}_rule) on aws_security_group.<group>."""
    out = []
    for name, body in m.resources_of(rtype).items():
        scopes = ev.instances(body) if is_known(ev.eval(body.get("for_each", [None]))) else [(None, {})]
        for _, scope in scopes:
            r = ev.block(body, scope)
            if r["security_group_id"] == Ref(f"aws_security_group.{group}.id"):
                out.append((name, r))
    return out


# ------------------------------------------------------------------ network


@check
def network_three_public_and_three_private_subnets_across_three_azs(t):
    m, ev = t.mod("network"), t.ev("network")
    for tier in ("public", "private"):
        s = m.resource("aws_subnet", tier)
        expect(ev.eval(s["count"]) == 3, f"{tier} subnets: count must be 3")
        azs = [ev.eval(s["availability_zone"], sc) for _, sc in ev.instances(s)]
        expect(len(set(azs)) == 3, f"{tier} subnets must be in three AZs, got {azs}")
        expect(all(ev.eval(s["map_public_ip_on_launch"], sc) is False for _, sc in ev.instances(s)),
               f"{tier} subnets must not give instances public addresses")
    cidrs = ev.local("public_cidrs") + ev.local("private_cidrs")
    expect(len(set(cidrs)) == 6, f"the six subnets need six ranges: {cidrs}")


@check
def network_private_subnets_route_through_nat(t):
    m, ev = t.mod("network"), t.ev("network")
    expect(m.resources_of("aws_nat_gateway"), "no NAT gateway")
    nat = m.resource("aws_nat_gateway", "this")
    expect(ev.eval(nat["subnet_id"], {"count": {"index": 0}}) == Ref("aws_subnet.public[0].id"),
           "the NAT gateway must be in a public subnet")
    route = m.resource("aws_route", "private_nat")
    for _, sc in ev.instances(route):
        r = ev.block(route, sc)
        expect(r["destination_cidr_block"] == "0.0.0.0/0" and isinstance(r["nat_gateway_id"], Ref),
               "the private route tables' default route must go to a NAT gateway")
        expect("aws_internet_gateway" not in str(r.get("gateway_id")), "private subnets must not route to the internet gateway")


@check
def network_vpc_endpoints_for_private_instances(t):
    m, ev = t.mod("network"), t.ev("network")
    s3 = ev.block(m.resource("aws_vpc_endpoint", "s3"))
    expect(s3["vpc_endpoint_type"] == "Gateway" and s3["service_name"].endswith(".s3"), "an S3 gateway endpoint")
    iface = m.resource("aws_vpc_endpoint", "interface")
    services = ev.eval(iface["for_each"])
    for needed in ("ssm", "ssmmessages", "ec2messages"):
        expect(needed in services, f"interface endpoint {needed} missing from the defaults")
    for _, sc in ev.instances(iface):
        e = ev.block(iface, sc)
        expect(e["private_dns_enabled"] is True, "interface endpoints need private DNS (jbake-ssm-get uses the public name)")
        expect(e["subnet_ids"] == Ref("aws_subnet.private[*].id"), "interface endpoints belong in the private subnets")


# ------------------------------------------------------------------ efs and backup


@check
def efs_encrypted_with_kms_in_private_subnets_nfs_only_from_controller(t):
    m, ev = t.mod("efs"), t.ev("efs")
    fs = ev.block(m.resource("aws_efs_file_system", "this"))
    expect(fs["encrypted"] is True, "the file system must be encrypted")
    expect(fs["kms_key_id"] == Ref("var.kms_key_arn"), "encrypted with the given customer managed key")
    private = [Ref("private-a"), Ref("private-b"), Ref("private-c")]
    mev = ev.__class__(m, {"subnet_ids": private}, COMMON_REFS)
    mt = m.resource("aws_efs_mount_target", "this")
    targets = [mev.block(mt, sc) for _, sc in mev.instances(mt)]
    expect([x["subnet_id"] for x in targets] == private, f"one mount target in each subnet given: {targets}")
    expect(all(x["security_groups"] == [Ref("aws_security_group.efs.id")] for x in targets), "mount targets behind the EFS group")
    sg = m.resource("aws_security_group", "efs")
    expect("ingress" not in sg and "egress" not in sg, "no inline rules on the EFS security group")
    rules = sg_rules(m, ev.__class__(m, {"client_security_group_ids": [Ref("controller-sg")]}, COMMON_REFS),
                     "aws_vpc_security_group_ingress_rule", "efs")
    expect(rules, "no ingress rule on the EFS security group")
    for name, r in rules:
        expect(r["from_port"] == 2049 and r["to_port"] == 2049 and r["ip_protocol"] == "tcp", f"{name}: NFS 2049 only")
        expect(r.get("cidr_ipv4") is None and r.get("cidr_ipv6") is None, f"{name}: from a security group, never a CIDR")
        expect(r["referenced_security_group_id"] == Ref("controller-sg"), f"{name}: from the clients given, nothing else")
    ex, exev = t.mod("example"), t.ev("example")
    efs = ex.modules["efs"]
    expect(exev.eval(efs["client_security_group_ids"]) == [Ref("module.controller.security_group_id")],
           "the example's EFS clients must be exactly the controller's security group")
    expect(exev.eval(efs["subnet_ids"]) == Ref("module.network.private_subnet_ids"), "mount targets in the private subnets")
    out = m.outputs["file_system_id"]
    expect("aws_efs_mount_target.this" in json.dumps(out.get("depends_on")),
           "file_system_id must wait for the mount targets (a controller baked for it must find them)")


@check
def backup_daily_plan_with_retention_selects_the_efs(t):
    m, ev = t.mod("backup"), t.ev("backup")
    vault = ev.block(m.resource("aws_backup_vault", "this"))
    expect(vault["kms_key_arn"] == Ref("var.kms_key_arn"), "the vault is encrypted with the given key")
    plan = m.resource("aws_backup_plan", "this")
    rule = ev.block(plan["rule"][0])
    expect(rule["target_vault_name"] == Ref("aws_backup_vault.this.name"), "the plan writes to the vault")
    expect(rule["schedule"].startswith("cron(") and rule["schedule"].split()[2:4] == ["*", "*"],
           f"a daily schedule: {rule['schedule']}")
    lc = ev.block(rule["lifecycle"][0])
    expect(lc["delete_after"] == ev.variable("retention_days"), "retention is the retention_days variable")
    sel = ev.block(m.resource("aws_backup_selection", "jenkins_home"))
    expect(sel["resources"] == [Ref("var.efs_arn")] and sel["plan_id"] == Ref("aws_backup_plan.this.id"),
           "the selection is the EFS, in the plan")
    ex, exev = t.mod("example"), t.ev("example")
    expect(exev.eval(ex.modules["backup"]["efs_arn"]) == Ref("module.efs.file_system_arn"), "the example backs up the EFS")


# ------------------------------------------------------------------ iam


def policy_statements(ev, doc, scope):
    out = []
    for st in doc.get("statement", []):
        out.append(ev.block(st, scope))
    for raw, dscope in ev.dynamic(doc, "statement", scope):
        out.append(ev.block(raw, dict(scope, **dscope)))
    return out


@check
def iam_instance_roles_read_only_their_own_parameters_by_arn(t):
    m = t.mod("iam")
    ev = t.ev("iam")
    doc = m.datum("aws_iam_policy_document", "instance")
    arn = f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter"
    own = {"controller": [f"{arn}/devops-tools/jenkins/id_rsa"], "agent": [f"{arn}/devops-tools/jenkins/id_rsa.pub"]}
    for role, scope in ev.instances(doc):
        stmts = policy_statements(ev, doc, scope)
        for st in stmts:
            actions = st.get("actions") or []
            if any(a.startswith("ssm:GetParameter") for a in actions) and st.get("effect", "Allow") == "Allow":
                expect(st["resources"] == own[role], f"{role}: ssm:GetParameter on {st['resources']}, not only {own[role]}")
        deny = [s for s in stmts if s.get("effect") == "Deny"]
        expect(deny and deny[0]["not_resources"] == own[role] and "ssm:GetParametersByPath" in deny[0]["actions"],
               f"{role}: an explicit Deny of every other parameter (NotResource = its own)")
    text = "\n".join(p.read_text() for p in (t.tf / "modules").rglob("*.tf"))
    expect("AmazonSSMManagedInstanceCore\"" not in text and "policy/AmazonSSMManagedInstanceCore" not in text,
           "AmazonSSMManagedInstanceCore (ssm:GetParameter on *) must not be attached")


@check
def iam_operator_policies_are_the_repository_json_files(t):
    m = t.mod("iam")
    ev = t.ev("iam")
    files = ev.local("policy_files")
    shipped = sorted(p.name for p in (t.root / "iam").glob("*.json"))
    expect(shipped, "iam/*.json is empty")
    expect(sorted(Path(f).name for f in files.values()) == shipped,
           f"the iam module reads {sorted(files.values())}, the repository ships {shipped}")
    expect(all(Path(f).resolve().parent == (t.root / "iam").resolve() for f in files.values()),
           "the default policy folder must be the repository's iam/")
    pol = m.resource("aws_iam_policy", "operator")
    expect(pol["policy"] == "${file(each.value)}", "each operator policy's document is file(each.value): no copy")
    # No copy anywhere: no Sid of a shipped policy appears in a .tf file.
    tf_text = "\n".join(p.read_text() for p in t.tf.rglob("*.tf"))
    for f in shipped:
        for st in json.loads((t.root / "iam" / f).read_text())["Statement"]:
            if st.get("Sid"):
                expect(f'"{st["Sid"]}"' not in tf_text, f"statement {st['Sid']} of iam/{f} is copied into the Terraform")
    pr = m.datum("aws_iam_policy_document", "pass_controller_role")
    st = ev.block(pr["statement"][0])
    expect(st["actions"] == ["iam:PassRole"] and st["resources"] == [Ref('aws_iam_role.instance["controller"].arn')],
           "roll may pass the controller's role only")


# ------------------------------------------------------------------ controller


def controller(t):
    return t.mod("controller"), t.ev("controller", CONTROLLER_VALUES, {"data.aws_ami.controller[0].id": "ami-0123456789abcdef0"})


@check
def controller_launch_template_imdsv2_encrypted_gp3_no_public_ip(t):
    m, ev = controller(t)
    lt = m.resource("aws_launch_template", "controller")
    md = ev.block(lt["metadata_options"][0])
    expect(md["http_tokens"] == "required", "IMDSv2 only: http_tokens = required")
    expect(md.get("http_endpoint", "enabled") == "enabled", "metadata reachable (jbake-ssm-get needs it)")
    expect(md["http_put_response_hop_limit"] == 1, "hop limit 1: no container on the controller reaches its role")
    ebs = ev.block(lt["block_device_mappings"][0]["ebs"][0])
    expect(ebs["encrypted"] is True and ebs["volume_type"] == "gp3", f"root volume encrypted gp3: {ebs}")
    ni = ev.block(lt["network_interfaces"][0])
    expect(ni["associate_public_ip_address"] is False, "no public IP on the controller")
    expect(Ref("aws_security_group.controller.id") in ni["security_groups"], "the controller's security group on its interface")
    expect("vpc_security_group_ids" not in lt, "security groups belong on the network interface")
    expect(lt["iam_instance_profile"] and ev.block(lt["iam_instance_profile"][0])["name"] == Ref("var.instance_profile_name"),
           "the controller runs with its instance profile")
    expect("user_data" not in lt, "no user data: the image carries everything (secrets come from SSM)")


@check
def controller_image_newest_tested_jbake_image_or_ssm_parameter(t):
    m, ev = controller(t)
    ami = m.datum("aws_ami", "controller")
    a = ev.block(ami)
    expect(a["owners"] == ["self"] and a["most_recent"] is True, "the account's own newest image")
    filters = {ev.eval(f["name"]): ev.eval(f["values"]) for f in ami["filter"]}
    for raw, scope in ev.dynamic(ami, "filter"):
        filters[ev.eval(raw["name"], scope)] = ev.eval(raw["values"], scope)
    expect(filters.get("tag:jbake:recipe") == ["jenkins-controller"], f"recipe filter: {filters}")
    expect(filters.get("tag:jbake:complete") == ["true"], "only complete images")
    expect(filters.get("tag:jbake:efs-id") == [Ref("var.efs_id")], "only images baked for this EFS")
    expect(filters.get("tag:jbake:tested") == ["true"], "only tested images (require_tested_image defaults to true)")
    ssm = t.ev("controller", dict(CONTROLLER_VALUES, image_source="ssm"))
    expect(ssm.local("image_id") == "resolve:ssm:/jbake/jenkins-controller/latest",
           f"image_source = ssm: {ssm.local('image_id')}")
    expect(ev.local("image_id") == "ami-0123456789abcdef0", "image_source = tags: the data source's image")


@check
def controller_group_of_exactly_one_in_private_subnets_with_elb_health_checks(t):
    m, ev = controller(t)
    asg = m.resource("aws_autoscaling_group", "controller")
    for k in ("min_size", "max_size", "desired_capacity"):
        expect(asg[k] == 1, f"{k} must be the literal 1, is {asg[k]!r}")
    g = ev.block(asg)
    expect(g["vpc_zone_identifier"] == Ref("var.private_subnet_ids"), "the controller lives in the private subnets")
    expect(g["health_check_type"] == "ELB", "ELB health checks")
    expect(g["target_group_arns"] == [Ref("aws_lb_target_group.controller.arn")], "registered in the controller's target group")
    lt = ev.block(asg["launch_template"][0])
    expect(lt["id"] == Ref("aws_launch_template.controller[0].id"), "launches from the controller's template")
    expect("instance_refresh" not in asg and "mixed_instances_policy" not in asg,
           "no instance_refresh (jbake roll replaces) and no mixed instances policy (roll needs the launch template)")
    ex, exev = t.mod("example"), t.ev("example")
    c = ex.modules["controller"]
    expect(exev.eval(c["private_subnet_ids"]) == Ref("module.network.private_subnet_ids"), "the example puts it in the private subnets")
    net = t.ev("network")
    expect(len(set(net.eval(t.mod("network").resource("aws_subnet", "private")["availability_zone"], sc)
                   for _, sc in net.instances(t.mod("network").resource("aws_subnet", "private")))) == 3,
           "three AZs: a roll's successor and a replacement can start beside the old controller")


@check
def controller_tagged_for_jbake_roll_discovery(t):
    m, ev = controller(t)
    asg = m.resource("aws_autoscaling_group", "controller")
    tags = {ev.eval(x["key"]): (ev.eval(x["value"]), ev.eval(x["propagate_at_launch"])) for x in asg["tag"]}
    expect(tags.get("jbake:role", (None,))[0] == "controller",
           f"jbake roll finds the group by jbake:role=controller (src/roll/discover.rs ROLE_TAG), tags: {tags}")
    # The roll policy's condition on the launch template (what it may add versions to) is met by
    # the module's launch template: read from the policy, not repeated here.
    roll = json.loads((t.root / "iam" / "jbake-roll-policy.json").read_text())
    lt_conditions = [st["Condition"]["StringEquals"] for st in roll["Statement"]
                     if "ec2:CreateLaunchTemplateVersion" in st["Action"] and "Condition" in st]
    expect(lt_conditions, "the roll policy scopes ec2:CreateLaunchTemplateVersion by a tag")
    lt_tags = ev.eval(m.resource("aws_launch_template", "controller")["tags"])
    for cond in lt_conditions:
        for key, value in cond.items():
            tag = key.removeprefix("aws:ResourceTag/")
            expect(lt_tags.get(tag) == value,
                   f"jbake roll may add versions only to a launch template tagged {tag}={value} (iam/jbake-roll-policy.json); the module's has {lt_tags}")
    agents, aev = t.mod("agents"), t.ev("agents")
    atags = {aev.eval(x["key"]): aev.eval(x["value"]) for x in agents.resource("aws_autoscaling_group", "agent")["tag"]}
    expect(atags.get("jbake:role") != "controller", "the agents' group must never look like the controller's")


@check
def controller_terraform_never_undoes_a_roll(t):
    m, _ = controller(t)
    asg = lifecycle_ignores(m.resource("aws_autoscaling_group", "controller"))
    for needed in ("launch_template[0].version", "desired_capacity", "max_size", "suspended_processes"):
        expect(needed in asg, f"the group's lifecycle must ignore {needed} (jbake roll changes it), ignores {asg}")
    expect("min_size" not in asg, "min_size stays Terraform's (1): a roll does not change it")
    lt_body = m.resource("aws_launch_template", "controller")
    lt = lifecycle_ignores(lt_body)
    for needed in ("image_id", "default_version"):
        expect(needed in lt, f"the launch template's lifecycle must ignore {needed}, ignores {lt}")
    expect(lt_body.get("update_default_version") is False, "update_default_version = false: Terraform never moves the default")


@check
def controller_health_check_login_with_short_thresholds(t):
    m, ev = controller(t)
    tg = ev.block(m.resource("aws_lb_target_group", "controller"))
    expect(tg["port"] == 8080 and tg["protocol"] == "HTTP", f"target group on 8080: {tg['port']}")
    hc = ev.block(m.resource("aws_lb_target_group", "controller")["health_check"][0])
    expect(hc["path"] == "/login" and hc["matcher"] == "200", f"health check GET /login -> 200: {hc}")
    expect(hc["healthy_threshold"] * hc["interval"] <= MAX_HEALTHY_SECONDS,
           f"healthy after {hc['healthy_threshold']} x {hc['interval']} s: more than {MAX_HEALTHY_SECONDS} s added to a roll's downtime")
    expect(hc["timeout"] < hc["interval"], "the timeout must be shorter than the interval")
    expect(tg["deregistration_delay"] <= 60, f"deregistration delay {tg['deregistration_delay']} s adds to every roll")
    grace = ev.eval(m.resource("aws_autoscaling_group", "controller")["health_check_grace_period"])
    expect(grace >= 300, f"grace period {grace} s: Jenkins' start on EFS takes minutes")


@check
def controller_alb_https_modern_tls_and_redirect(t):
    m, ev = controller(t)
    https = ev.block(m.resource("aws_lb_listener", "https"))
    expect(https["port"] == 443 and https["protocol"] == "HTTPS", "an HTTPS listener on 443")
    expect(https["ssl_policy"] in MODERN_TLS_POLICIES, f"TLS policy {https['ssl_policy']} is not a TLS 1.3/1.2 one")
    expect(https["certificate_arn"] == CONTROLLER_VALUES["certificate_arn"], "the certificate is the variable's")
    expect("default" not in m.variables["certificate_arn"], "certificate_arn has no default")
    fwd = ev.block(m.resource("aws_lb_listener", "https")["default_action"][0])
    expect(fwd["type"] == "forward" and fwd["target_group_arn"] == Ref("aws_lb_target_group.controller.arn"), "HTTPS forwards to Jenkins")
    http = m.resource("aws_lb_listener", "http_redirect")
    h = ev.block(http)
    expect(h["port"] == 80 and h["protocol"] == "HTTP", "an HTTP listener on 80")
    act = ev.block(http["default_action"][0])
    red = ev.block(http["default_action"][0]["redirect"][0])
    expect(act["type"] == "redirect" and red["protocol"] == "HTTPS" and red["status_code"] == "HTTP_301",
           "HTTP redirects to HTTPS")
    lb = ev.block(m.resource("aws_lb", "this"))
    expect(lb["drop_invalid_header_fields"] is True, "drop invalid headers")
    expect(lb["subnets"] == Ref("var.public_subnet_ids"), "an internet-facing load balancer lives in the public subnets")


@check
def controller_security_groups(t):
    m, ev = controller(t)
    for name, sg in m.resources_of("aws_security_group").items():
        expect("ingress" not in sg and "egress" not in sg, f"aws_security_group.{name}: rules as separate resources only")
    alb_in = sg_rules(m, ev, "aws_vpc_security_group_ingress_rule", "alb")
    expect(alb_in, "the load balancer takes no traffic")
    for name, r in alb_in:
        expect(r["cidr_ipv4"] in CONTROLLER_VALUES["allowed_cidrs"] and r["from_port"] in (80, 443),
               f"alb {name}: only 80/443 from allowed_cidrs: {r}")
    expect("default" not in m.variables["allowed_cidrs"], "allowed_cidrs has no default: nobody gets Jenkins open to the world by accident")
    c_in = sg_rules(m, ev.__class__(m, dict(CONTROLLER_VALUES, ssh_cidrs=["10.99.0.0/24"]), COMMON_REFS),
                    "aws_vpc_security_group_ingress_rule", "controller")
    ports = {}
    for name, r in c_in:
        ports.setdefault(r["from_port"], []).append(r)
    expect(set(ports) == {8080, 22}, f"the controller takes 8080 and 22 only: {sorted(ports)}")
    expect(all(r.get("referenced_security_group_id") == Ref("aws_security_group.alb.id") and r.get("cidr_ipv4") is None
               for r in ports[8080]), "8080 only from the load balancer's group")
    expect(all(r["cidr_ipv4"] == "10.99.0.0/24" for r in ports[22]), "SSH only from ssh_cidrs")
    expect(ev.eval(m.variables["ssh_cidrs"]["default"]) == [], "no SSH by default")
    bad = False
    try:
        v = m.variables["ssh_cidrs"]["validation"][0]
        bad = ev.__class__(m, {"ssh_cidrs": ["0.0.0.0/0"]}, COMMON_REFS).eval(v["condition"]) is False
    except (KeyError, EvalError):
        bad = False
    expect(bad, "ssh_cidrs must refuse 0.0.0.0/0")


@check
def no_ingress_from_anywhere(t):
    for mod in ("network", "efs", "controller", "agents"):
        m = t.mod(mod)
        ev = t.ev(mod, CONTROLLER_VALUES if mod == "controller" else {})
        for name, body in m.resources_of("aws_vpc_security_group_ingress_rule").items():
            cidr = body.get("cidr_ipv4")
            if cidr is not None:
                expect(ev.eval(cidr) != "0.0.0.0/0" or False, f"{mod}: ingress rule {name} from 0.0.0.0/0")


# ------------------------------------------------------------------ agents


@check
def agents_private_ssh_only_from_controller(t):
    m, ev = t.mod("agents"), t.ev("agents", refs={"data.aws_ami.agent[0].id": "ami-0a"})
    rules = sg_rules(m, ev, "aws_vpc_security_group_ingress_rule", "agent")
    expect(len(rules) == 1, f"the agents take exactly one ingress rule: {rules}")
    r = rules[0][1]
    expect(r["from_port"] == 22 and r["to_port"] == 22 and r.get("referenced_security_group_id") == Ref("var.controller_security_group_id")
           and r.get("cidr_ipv4") is None, f"SSH from the controller's group only: {r}")
    lt = m.resource("aws_launch_template", "agent")
    expect(ev.block(lt["metadata_options"][0])["http_tokens"] == "required", "agents: IMDSv2 only")
    expect(ev.block(lt["network_interfaces"][0])["associate_public_ip_address"] is False, "agents: no public IP")
    expect(ev.block(lt["block_device_mappings"][0]["ebs"][0])["encrypted"] is True, "agents: encrypted root volume")
    g = ev.block(m.resource("aws_autoscaling_group", "agent"))
    expect(g["vpc_zone_identifier"] == Ref("var.private_subnet_ids"), "agents in the private subnets")


# ------------------------------------------------------------------ monitoring


@check
def monitoring_logs_alarms_and_topic(t):
    m, ev = t.mod("monitoring"), t.ev("monitoring")
    lg = m.resource("aws_cloudwatch_log_group", "this")
    groups = [ev.eval(lg["name"], sc) for _, sc in ev.instances(lg)]
    expect(any(g.endswith("/controller/jenkins") for g in groups) and any(g.endswith("/controller/system") for g in groups),
           f"log groups for Jenkins and the system: {groups}")
    expect(ev.block(lg)["kms_key_id"] == Ref("var.kms_key_arn"), "log groups encrypted")
    topic = ev.block(m.resource("aws_sns_topic", "alarms"))
    expect(topic["kms_master_key_id"] == Ref("var.kms_key_arn"), "the topic is encrypted")
    metrics = {}
    for name, body in m.resources_of("aws_cloudwatch_metric_alarm").items():
        a = ev.block(body)
        expect(a.get("alarm_actions") == [Ref("aws_sns_topic.alarms.arn")], f"alarm {name} must notify the topic")
        names = [a.get("metric_name")] + [ev.block(q["metric"][0])["metric_name"] for q in body.get("metric_query", []) if "metric" in q]
        for n in names:
            if n:
                metrics[n] = name
    for needed in ("UnHealthyHostCount", "HealthyHostCount", "BurstCreditBalance", "PermittedThroughput", "GroupTerminatingInstances"):
        expect(needed in metrics, f"no alarm on {needed}: {sorted(metrics)}")
    n = ev.block(m.resource("aws_autoscaling_notification", "controller"))
    expect("autoscaling:EC2_INSTANCE_TERMINATE" in n["notifications"], "the controller's replacements are notified")


# ------------------------------------------------------------------ runner


def run_checks(root, quiet=False):
    t = Tree(root)
    failed = []
    for fn in CHECKS:
        try:
            fn(t)
            if not quiet:
                print(f"ok    {fn.__name__}")
        except (Failure, EvalError, KeyError, TypeError, ValueError, IndexError) as e:
            failed.append((fn.__name__, str(e) or type(e).__name__))
            if not quiet:
                print(f"FAIL  {fn.__name__}: {e}")
                if not isinstance(e, Failure):
                    traceback.print_exc(file=sys.stdout)
    return failed


# (file under the repository, text, replacement, the check that must fail)
MUTATIONS = [
    ("terraform/modules/controller/main.tf", 'http_tokens                 = "required"', 'http_tokens                 = "optional"',
     "controller_launch_template_imdsv2_encrypted_gp3_no_public_ip"),
    ("terraform/modules/controller/main.tf", "associate_public_ip_address = false", "associate_public_ip_address = true",
     "controller_launch_template_imdsv2_encrypted_gp3_no_public_ip"),
    ("terraform/modules/controller/main.tf", "      encrypted             = true", "      encrypted             = false",
     "controller_launch_template_imdsv2_encrypted_gp3_no_public_ip"),
    ("terraform/modules/controller/main.tf", '    value               = "controller"', '    value               = "jenkins"',
     "controller_tagged_for_jbake_roll_discovery"),
    ("terraform/modules/controller/main.tf", '  tags = merge(var.tags, { "jbake:role" = "controller" })', "  tags = var.tags",
     "controller_tagged_for_jbake_roll_discovery"),
    ("terraform/modules/controller/main.tf", "  max_size         = 1", "  max_size         = 2",
     "controller_group_of_exactly_one_in_private_subnets_with_elb_health_checks"),
    ("terraform/modules/controller/main.tf", '  health_check_type         = "ELB"', '  health_check_type         = "EC2"',
     "controller_group_of_exactly_one_in_private_subnets_with_elb_health_checks"),
    ("terraform/modules/controller/main.tf", "      suspended_processes,", "",
     "controller_terraform_never_undoes_a_roll"),
    ("terraform/modules/controller/main.tf", "ignore_changes = [image_id, default_version]", "ignore_changes = [default_version]",
     "controller_terraform_never_undoes_a_roll"),
    ("terraform/modules/controller/variables.tf", '  default     = "/login"', '  default     = "/"',
     "controller_health_check_login_with_short_thresholds"),
    ("terraform/modules/controller/variables.tf", "  default     = 2\n", "  default     = 5\n",
     "controller_health_check_login_with_short_thresholds"),
    ("terraform/modules/controller/variables.tf", '  default     = "ELBSecurityPolicy-TLS13-1-2-Res-2021-06"', '  default     = "ELBSecurityPolicy-2016-08"',
     "controller_alb_https_modern_tls_and_redirect"),
    ("terraform/modules/controller/main.tf", '      status_code = "HTTP_301"', '      status_code = "HTTP_302"',
     "controller_alb_https_modern_tls_and_redirect"),
    ("terraform/modules/controller/main.tf", "  referenced_security_group_id = aws_security_group.alb.id",
     '  cidr_ipv4                    = "10.0.0.0/8"', "controller_security_groups"),
    ("terraform/modules/efs/main.tf", "  encrypted        = true", "  encrypted        = false",
     "efs_encrypted_with_kms_in_private_subnets_nfs_only_from_controller"),
    ("terraform/modules/efs/main.tf", "  from_port                    = 2049", "  from_port                    = 0",
     "efs_encrypted_with_kms_in_private_subnets_nfs_only_from_controller"),
    ("terraform/examples/complete/main.tf", "client_security_group_ids = [module.controller.security_group_id]",
     "client_security_group_ids = [module.controller.alb_security_group_id]",
     "efs_encrypted_with_kms_in_private_subnets_nfs_only_from_controller"),
    ("terraform/modules/backup/main.tf", "  resources    = [var.efs_arn]", "  resources    = []",
     "backup_daily_plan_with_retention_selects_the_efs"),
    ("terraform/modules/iam/main.tf", '    resources = [for p in each.value.parameters : "${local.parameter_arn_prefix}${p}"]',
     '    resources = ["${local.parameter_arn_prefix}/*"]', "iam_instance_roles_read_only_their_own_parameters_by_arn"),
    ("terraform/modules/iam/main.tf", "  policy      = file(each.value)", '  policy      = jsonencode({ Version = "2012-10-17", Statement = [] })',
     "iam_operator_policies_are_the_repository_json_files"),
    ("terraform/modules/agents/main.tf", "  referenced_security_group_id = var.controller_security_group_id",
     '  cidr_ipv4                    = "0.0.0.0/0"', "agents_private_ssh_only_from_controller"),
    ("terraform/modules/network/main.tf", "  private_dns_enabled = true", "  private_dns_enabled = false",
     "network_vpc_endpoints_for_private_instances"),
    ("terraform/modules/monitoring/main.tf", '  metric_name         = "UnHealthyHostCount"', '  metric_name         = "RequestCount"',
     "monitoring_logs_alarms_and_topic"),
]


def run_mutations(root):
    missed = 0
    for rel, old, new, expected in MUTATIONS:
        with tempfile.TemporaryDirectory(prefix="jbake-tf-mutation-") as tmp:
            for sub in ("terraform", "iam"):
                shutil.copytree(Path(root) / sub, Path(tmp) / sub)
            target = Path(tmp) / rel
            text = target.read_text()
            if text.count(old) != 1:
                print(f"MISSED {rel}: {old!r} occurs {text.count(old)} times (the mutation no longer applies)")
                missed += 1
                continue
            target.write_text(text.replace(old, new))
            failed = dict(run_checks(tmp, quiet=True))
            what = f"{rel}: {old.strip()!r} -> {new.strip()!r}"
            if expected in failed:
                print(f"caught {what}: {expected}: {failed[expected]}")
            else:
                print(f"MISSED {what}: {expected} still passes (failed: {sorted(failed) or 'none'})")
                missed += 1
    print(f"{len(MUTATIONS) - missed} passed, {missed} failed")
    return missed


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(DEFAULT_ROOT), help="the repository (terraform/ and iam/ in it)")
    ap.add_argument("--mutations", action="store_true", help="check that each mutation is caught")
    args = ap.parse_args()
    if args.mutations:
        sys.exit(1 if run_mutations(args.root) else 0)
    failed = run_checks(args.root)
    print(f"{len(CHECKS) - len(failed)} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

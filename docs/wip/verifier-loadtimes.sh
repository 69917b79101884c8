#!/bin/sh
# Start the daemon once with debug logging and print each program's load
# time (LOADTIMES lines) and, when a program was refused, the end of what
# the verifier said about the first one (WHY lines: processed instructions, states,
# stack depth). Run it in the VM as the only test:
#   cargo xtask test --vm-only --kernel 6.12 --only-extra \
#       --vm-timeout 2600 --extra-test-bin docs/wip/verifier-loadtimes.sh
# (allow 10 minutes when the file hooks take minutes to verify). It ends
# with a test-result line for the harness: passed once the daemon was
# ready, failed if it never was.
D=/tmp/loadtimes.$$
mkdir -p $D/policies
cat > $D/policies/a.toml <<'P'
[agent]
name = "lt"
[files]
default = "allow"
[[files.rule]]
id = "d"
decision = "deny"
paths = ["/var/lib/postgresql/**"]
P
cat > $D/agentguard.toml <<C
policy_dir = "$D/policies"
events_log = "$D/events.jsonl"
socket = "$D/agentguard.sock"
cgroup_subtree = "agentguard-lt"
pin_dir = "/sys/fs/bpf/agentguard-lt"
incident_dir = "$D/incidents"
chain_head = "$D/chain-head"
run_state = "$D/sessions.json"
C
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
start=$(date +%s)
AGENTGUARD_LOG=debug /bin/agentguard --config $D/agentguard.toml daemon > $D/out 2> $D/err &
pid=$!
i=0
while ! grep -q ready $D/out 2>/dev/null && [ $i -lt 1500 ]; do sleep 1; i=$((i+1)); done
end=$(date +%s)
/bin/agentguard --config $D/agentguard.toml stop --unload > /dev/null 2>&1
kill $pid 2>/dev/null
wait $pid 2>/dev/null
echo "LOADTIMES ready after $((end-start)) s"
grep "loaded into the kernel" $D/err | sed 's/.*program="\{0,1\}\([^" ]*\)"\{0,1\} ms=\([0-9]*\) ok=\([a-z]*\).*/LOADTIMES \2 ms \1 ok=\3/'
awk '/unavailable program=/{if(on)exit; on=1} on{buf[n++ % 300]=$0} END{for(i=n-300;i<n;i++) if(i>=0) print "WHY " substr(buf[i % 300],1,400)}' $D/err
# The harness reads the test line: a daemon that never became ready is a
# failure, not a measurement.
if grep -q ready $D/out 2>/dev/null; then
    echo "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s"
else
    echo "LOADTIMES the daemon was not ready after $i s"
    echo "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s"
fi

#!/bin/sh
# What a tagged file action costs the kernel, per program run, for one or
# more builds of the daemon in the same VM (session 19). Each build runs
# the B1 loops (ag-bench-files' own workload child) untagged and tagged,
# and the kernel's account of every program over exactly the timed loop
# is printed (HC lines: ns_per_run of the program with runs_per_op=1.000
# is the hook's cost, accounting included, ~110 ns per run under TCG).
#
#   cargo build --release -p agentguard-userspace
#   cp target/release/agentguard /tmp/hc/agv1     # one file per build: agvNAME
#   cargo build --release -p agentguard-tests --bin ag-bench-files
#   cp target/release/ag-bench-files /tmp/hc/abf
#   cargo xtask test --vm-only --kernel 6.12 --only-extra --vm-cpus 1 \
#       --vm-timeout 2400 --extra-test-bin docs/wip/hitcost.sh \
#       --extra-test-bin /tmp/hc/abf --extra-test-bin /tmp/hc/agv1 ...
#
# The builds and the bench binary run as tests after this script, which
# removes them first (the harness then reports them as failed: ignore).
# One vCPU, as the benchmark's VM: with two, a vCPU's clock also ran
# through the other's turns.
B=/tests/abf
D=/tmp/hc
OPS="unlink rename rmdir"
SETS="2000:/dev/shm/agentguard-bench-files-1"
mkdir -p $D/policies /tmp/w; mount | grep -E " / | /dev | /dev/shm | /tmp " | sed "s/^/HC mount /"
# The benchmark's own policy.
$B policy > $D/policies/bench.toml
cat > $D/agentguard.toml <<C
policy_dir = "$D/policies"
events_log = "$D/events.jsonl"
socket = "$D/agentguard.sock"
cgroup_subtree = "agentguard-hc"
pin_dir = "/sys/fs/bpf/agentguard-hc"
incident_dir = "$D/incidents"
chain_head = "$D/chain-head"
run_state = "$D/sessions.json"
C
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
snap() {
  for f in /proc/$1/fdinfo/*; do
    id=$(grep prog_id $f 2>/dev/null | awk '{print $2}')
    [ -n "$id" ] && echo "$id $(grep run_time_ns $f | awk '{print $2}') $(grep run_cnt $f | awk '{print $2}')"
  done
}
# one LABEL OP DAEMONPID [prefix...]: the child's ns/op, and each program's
# run time and runs over exactly its timed loop.
one() {
  label=$1; op=$2; dpid=$3; shift 3
  rm -f $D/fifo $D/child.out; mkfifo $D/fifo
  "$@" $B loop $op $N $W < $D/fifo > $D/child.out 2>&1 &
  cpid=$!
  exec 3> $D/fifo
  while ! grep -q ready $D/child.out 2>/dev/null; do usleep 50000; done
  [ -n "$dpid" ] && snap $dpid > $D/s1
  echo go >&3
  while ! grep -q ns_per_op $D/child.out 2>/dev/null; do usleep 50000; done
  [ -n "$dpid" ] && snap $dpid > $D/s2
  echo done >&3
  exec 3>&-
  wait $cpid
  echo "HC $label $op N=$N W=$W $(grep ns_per_op $D/child.out)"
  if [ -n "$dpid" ]; then
    awk -v L="$label" -v S="$op:$N:$W" -v N=$N 'NR==FNR{t[$1]=$2;c[$1]=$3;next} {dt=$2-t[$1]; dc=$3-c[$1]; if (dc>0) printf "HC %s %s prog %s ns_per_op=%.1f runs_per_op=%.3f ns_per_run=%.1f\n", L, S, $1, dt/N, dc/N, dt/dc}' $D/s1 $D/s2
  fi
}
VARIANTS=$(ls /tests | grep '^agv' | sed 's/agv//')
for set in $SETS; do N=${set%%:*}; W=${set#*:}; mkdir -p $W; for op in $OPS; do for i in 1 2 3; do one base-$i $op ""; done; done; done
for v in $VARIANTS; do
  A=/tests/agv$v
  # A build named agvNAME-debug runs its daemon with debug logging (as
  # the benchmark's harness starts it).
  case $v in *-debug) export AGENTGUARD_LOG=debug ;; *) unset AGENTGUARD_LOG ;; esac
  $A --config $D/agentguard.toml daemon > $D/out 2> $D/err &
  pid=$!
  i=0
  while ! grep -q ready $D/out 2>/dev/null && [ $i -lt 600 ]; do sleep 1; i=$((i+1)); done
  echo "HC v$v ready after $i s"
  $A --config $D/agentguard.toml run --agent bench -- sleep 3600 > /dev/null 2>&1 &
  keeper=$!
  sleep 20
  echo 1 > /proc/sys/kernel/bpf_stats_enabled
  for set in $SETS; do N=${set%%:*}; W=${set#*:}; mkdir -p $W
  for op in $OPS; do
    for i in 1 2 3; do
      one v$v-untagged-$i $op $pid
      one v$v-tagged-$i $op $pid $A --config $D/agentguard.toml run --agent bench --
    done
  done
  done
  echo 0 > /proc/sys/kernel/bpf_stats_enabled
  kill $keeper 2>/dev/null
  $A --config $D/agentguard.toml stop --unload > /dev/null 2>&1
  kill $pid 2>/dev/null
  wait $pid 2>/dev/null
  grep -i "error\|warn" $D/err | head -5 | sed 's/^/HC err /'
done
rm -f /tests/abf /tests/agv*
echo "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s"

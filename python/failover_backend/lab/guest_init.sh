#!/bin/busybox sh
# /init of the lab guest: load the failover drivers, bring the failover master up
# with the address given on the kernel command line (fb.ip=A.B.C.D/N), then serve
# commands on the serial console.
#
# Console protocol (one line each way):
#   host  -> guest   ID:shell command
#   guest -> host    FB-BEGIN ID / output lines / FB-END ID EXIT-CODE
# Progress markers: FB-MODULES-LOADED, FB-NET-UP <master>, FB-NO-FAILOVER-MASTER,
# FB-CONSOLE-READY.

/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin /run
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
stty -echo -onlcr 2>/dev/null

for module in $(cat /etc/fb-modules); do
    insmod "/lib/modules/$module" || echo "FB-INSMOD-FAILED $module"
done
echo "FB-MODULES-LOADED"

arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
address="$(arg fb.ip)"
ip link set lo up

# The failover master is the netdev its slaves name as their master.
failover_master() {
    for link in /sys/class/net/*/master; do
        [ -e "$link" ] && basename "$(readlink "$link")" && return 0
    done
    return 1
}

master=""
for _ in $(seq 1 100); do
    master="$(failover_master)" && break
    sleep 0.1
done
if [ -n "$master" ]; then
    [ -n "$address" ] && ip addr add "$address" dev "$master"
    ip link set "$master" up
    echo "FB-NET-UP $master"
else
    echo "FB-NO-FAILOVER-MASTER"
fi

echo "FB-CONSOLE-READY"
while read -r line; do
    id="${line%%:*}"
    command="${line#*:}"
    echo "FB-BEGIN $id"
    sh -c "$command" 2>&1
    echo "FB-END $id $?"
done
echo "FB-CONSOLE-CLOSED"
sleep 86400

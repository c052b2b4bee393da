#!/bin/busybox sh
# /init of the lab guest: load the failover drivers, bring the failover master up
# with the address given on the kernel command line (fb.ip=A.B.C.D/N), then serve
# commands on the serial console.
#
# Console protocol (one line each way):
#   host  -> guest   ID:shell command
#   guest -> host    FB-BEGIN ID / output lines / FB-END ID EXIT-CODE
# Progress markers: FB-MODULES-LOADED, FB-NET-UP <master>, FB-NO-FAILOVER-MASTER,
# FB-CONSOLE-READY. With fb.watch=1 on the kernel command line, a line
#   FB-SLAVES <name>:<driver>:<carrier> ...
# each time the set of failover slaves or their carrier changes (polled every 50 ms):
# when the guest registered a primary, and when its link came up.

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

# A failover master is the netdev its slaves name as their master.
failover_masters() {
    for link in /sys/class/net/*/master; do
        [ -e "$link" ] && basename "$(readlink "$link")"
    done | sort -u
}

# Every failover master (fb.masters=N of them, default 1), once its standby
# registered (a primary may come later).
expected="$(arg fb.masters)"
masters=""
count=0
for _ in $(seq 1 100); do
    masters="$(failover_masters)"
    count=0
    for master in $masters; do count=$((count + 1)); done
    [ "$count" -ge "${expected:-1}" ] && break
    sleep 0.1
done
if [ -n "$masters" ]; then
    if [ "$count" -gt 1 ]; then
        # Several masters on one link: each answers ARP for its own address only.
        echo 1 > /proc/sys/net/ipv4/conf/all/arp_ignore
        echo 2 > /proc/sys/net/ipv4/conf/all/arp_announce
    fi
    # fb.ip.<MAC without colons>=A.B.C.D/N for a master of its own; fb.ip for the
    # first one without.
    main=""
    for master in $masters; do
        read -r mac < "/sys/class/net/$master/address"
        own="$(arg "fb.ip.$(echo "$mac" | tr -d :)")"
        if [ -z "$own" ] && [ -z "$main" ]; then
            own="$address"
            main="$master"
        fi
        [ -n "$own" ] && ip addr add "$own" dev "$master"
        ip link set "$master" up
    done
    echo "FB-NET-UP ${main:-$master}"
else
    echo "FB-NO-FAILOVER-MASTER"
fi

watch_slaves() {
    last=""
    while :; do
        now=""
        for d in /sys/class/net/*; do
            [ -e "$d/master" ] || continue
            c=""
            read -r c < "$d/carrier" 2>/dev/null
            now="$now ${d##*/}:${c:-0}"
        done
        if [ "$now" != "$last" ]; then
            out=""
            for entry in $now; do
                name="${entry%%:*}"
                driver="$(readlink "/sys/class/net/$name/device/driver")"
                out="$out $name:${driver##*/}:${entry#*:}"
            done
            echo "FB-SLAVES$out"
            last="$now"
        fi
        usleep 50000
    done
}
[ "$(arg fb.watch)" = 1 ] && watch_slaves &

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

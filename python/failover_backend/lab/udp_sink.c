/* udp-sink PORT FILE: append every UDP datagram that reaches PORT to FILE, as it came.
 *
 * The lab guest's busybox has no UDP receiver; this one is built static on the host
 * and put in the guest's initramfs. It runs until killed; the datagrams of the
 * integrity test are text lines, so FILE ends up with one line per datagram. */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: udp-sink PORT FILE\n");
        return 2;
    }
    int sock = socket(AF_INET, SOCK_DGRAM, 0);
    int buffer = 4 << 20;
    setsockopt(sock, SOL_SOCKET, SO_RCVBUF, &buffer, sizeof buffer);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    address.sin_addr.s_addr = htonl(INADDR_ANY);
    if (sock < 0 || bind(sock, (struct sockaddr *)&address, sizeof address) < 0) {
        perror("udp-sink");
        return 1;
    }
    int out = open(argv[2], O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (out < 0) {
        perror(argv[2]);
        return 1;
    }
    static char datagram[65536];
    for (;;) {
        ssize_t len = recv(sock, datagram, sizeof datagram, 0);
        if (len > 0 && write(out, datagram, (size_t)len) != len) {
            perror("udp-sink: write");
            return 1;
        }
    }
}

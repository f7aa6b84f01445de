/* Kept here so that the benchmark can be rerun from a clone: the team's C epoll reference server,
 * copied unchanged from the steering folder's shared/bench/limit_server.c. Not part of the product:
 * only bench/chat_bench.py runs it (--vs "/tmp/limit_server {port}"). */
/* Reference "limit" server: the fan-out part of the chat protocol (join, broadcast, echo) in C with
 * epoll, coalesced writes per loop turn and TCP_NODELAY. No limits and no validation: a ceiling for
 * what a fan-out server reaches on this machine with the same load generator. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#define MAXC 65536
typedef struct { int fd, joined, dirty; char nick[64]; char in[65536]; int inlen; char *out; size_t outlen, outcap; } C;
static C *cl[MAXC]; static int dirtyl[MAXC], ndirty;
static void put(C *c, const char *s, size_t n) {
  if (c->outlen + n > c->outcap) { c->outcap = (c->outlen + n) * 2; c->out = realloc(c->out, c->outcap); }
  memcpy(c->out + c->outlen, s, n); c->outlen += n;
  if (!c->dirty) { c->dirty = 1; dirtyl[ndirty++] = c->fd; }
}
static char ts[32];
static void stamp(void) { time_t t = time(0); strftime(ts, sizeof ts, "%Y-%m-%d %H:%M", localtime(&t)); }
static int njoined; static C *joinedl[MAXC];
int main(int argc, char **argv) {
  int port = argc > 1 ? atoi(argv[1]) : 8000;
  int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
  setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(ls, (void *)&a, sizeof a) || listen(ls, 1024)) { perror("bind"); return 1; }
  int ep = epoll_create1(0); struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
  epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
  struct epoll_event evs[1024]; char msg[70000];
  for (;;) {
    int n = epoll_wait(ep, evs, 1024, -1); stamp();
    for (int i = 0; i < n; i++) {
      int fd = evs[i].data.fd;
      if (fd == ls) {
        int s;
        while ((s = accept4(ls, 0, 0, SOCK_NONBLOCK)) >= 0) {
          setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
          C *c = calloc(1, sizeof *c); c->fd = s; cl[s] = c;
          struct epoll_event e = {.events = EPOLLIN, .data.fd = s}; epoll_ctl(ep, EPOLL_CTL_ADD, s, &e);
          put(c, "Wellcome! Please enter your nickname\n", 37);
        }
        continue;
      }
      C *c = cl[fd]; if (!c) continue;
      if (evs[i].events & EPOLLOUT) {
        ssize_t w = write(fd, c->out, c->outlen);
        if (w > 0) { memmove(c->out, c->out + w, c->outlen - w); c->outlen -= w; }
        if (!c->outlen) { struct epoll_event e = {.events = EPOLLIN, .data.fd = fd}; epoll_ctl(ep, EPOLL_CTL_MOD, fd, &e); }
        if (!(evs[i].events & EPOLLIN)) continue;
      }
      ssize_t r = read(fd, c->in + c->inlen, sizeof c->in - c->inlen);
      if (r <= 0) {
        epoll_ctl(ep, EPOLL_CTL_DEL, fd, 0); close(fd); cl[fd] = 0;
        if (c->joined) { for (int k = 0; k < njoined; k++) if (joinedl[k] == c) { joinedl[k] = joinedl[--njoined]; break; } }
        free(c->out); free(c); continue;  /* dirty list entries are checked against cl[] */
      }
      c->inlen += r; char *p = c->in, *end = c->in + c->inlen, *nl;
      while ((nl = memchr(p, '\n', end - p))) {
        size_t ll = nl - p; if (ll && p[ll - 1] == '\r') ll--;
        if (!c->joined) {
          memcpy(c->nick, p, ll < 63 ? ll : 63); c->nick[ll < 63 ? ll : 63] = 0; c->joined = 1; joinedl[njoined++] = c;
          int m = snprintf(msg, sizeof msg, "%s: Server: ok!\n", ts); put(c, msg, m);
        } else if (njoined > 1) {
          int m = snprintf(msg, sizeof msg, "%s: %s sent %.*s\n", ts, c->nick, (int)ll, p);
          for (int k = 0; k < njoined; k++) if (joinedl[k] != c) put(joinedl[k], msg, m);
          m = snprintf(msg, sizeof msg, "%s: Server: ok!\n%s: YOU SEND USERS %.*s\n", ts, ts, (int)ll, p); put(c, msg, m);
        }
        p = nl + 1;
      }
      c->inlen = end - p; memmove(c->in, p, c->inlen);
    }
    for (int i = 0; i < ndirty; i++) { C *c = cl[dirtyl[i]]; if (!c) continue; c->dirty = 0;
      ssize_t w = write(c->fd, c->out, c->outlen); if (w > 0) { memmove(c->out, c->out + w, c->outlen - w); c->outlen -= w; }
      if (c->outlen) { struct epoll_event e = {.events = EPOLLIN | EPOLLOUT, .data.fd = c->fd}; epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e); } }
    ndirty = 0;
  }
}

package main

// STUN mode (-stun host:port): Tailscale's own STUN code (tailscale.com/net/stun,
// what tailscaled's netcheck sends to every DERP region) asks the server for
// this socket's address. Checks:
//
//   - stun_binding: a Binding Request (stun.Request) from a local UDP socket
//     gets a Binding Success (stun.ParseResponse) with the same transaction
//     id whose mapped address is the socket's own address (on loopback there
//     is no NAT in between);
//   - stun_drops_non_tailscale: a plain RFC 5389 Binding Request without
//     Tailscale's SOFTWARE and FINGERPRINT attributes, and a datagram that is
//     not STUN, get no answer (derper drops both), while a Tailscale request
//     sent after them on the same socket is still answered.
//
// With -url as well, the DERP checks run first.

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"

	"tailscale.com/net/stun"
)

var flagSTUN = flag.String("stun", "", "STUN server host:port (UDP): check Binding with tailscale.com/net/stun (may be used without -url)")

// stunRetry is how often an unanswered request is resent (UDP may drop it).
const stunRetry = 500 * time.Millisecond

// stunQuiet is how long a datagram that must not be answered is given.
const stunQuiet = 500 * time.Millisecond

func runSTUN() {
	server, err := net.ResolveUDPAddr("udp", *flagSTUN)
	if err != nil {
		report("stun_binding", false, "resolve -stun %q: %v", *flagSTUN, err)
		return
	}
	// A connected socket: the kernel picks a concrete local address (what the
	// server must report back) and only the server's datagrams are read.
	conn, err := net.DialUDP("udp", nil, server)
	if err != nil {
		report("stun_binding", false, "dial %v: %v", server, err)
		return
	}
	defer conn.Close()
	local := conn.LocalAddr().(*net.UDPAddr).AddrPort()
	local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())

	if !checkSTUNBinding(conn, local) {
		return
	}
	checkSTUNDropsNonTailscale(conn, local)
}

type stunAnswer struct {
	mapped  netip.AddrPort
	size    int
	sends   int
	refused int // sends answered by ICMP port unreachable
	rtt     time.Duration
}

var errNoAnswer = errors.New("no answer")

// stunExchange sends stun.Request(tx), resending every stunRetry, until an
// answer with transaction id tx arrives or within has passed. Answers to other
// transactions are errors: nothing else was meant to be answered.
func stunExchange(conn *net.UDPConn, tx stun.TxID, within time.Duration) (stunAnswer, error) {
	req := stun.Request(tx)
	var a stunAnswer
	start := time.Now()
	deadline := start.Add(within)
	buf := make([]byte, 64<<10)
	for time.Now().Before(deadline) {
		if _, err := conn.Write(req); err != nil {
			return a, fmt.Errorf("send: %w", err)
		}
		a.sends++
		wait := time.Now().Add(stunRetry)
		if wait.After(deadline) {
			wait = deadline
		}
		for {
			conn.SetReadDeadline(wait)
			n, err := conn.Read(buf)
			if errors.Is(err, os.ErrDeadlineExceeded) {
				break // resend
			}
			if errors.Is(err, syscall.ECONNREFUSED) {
				// ICMP port unreachable: nothing bound there (yet). Resend at the next retry.
				a.refused++
				time.Sleep(time.Until(wait))
				break
			}
			if err != nil {
				return a, fmt.Errorf("receive: %w", err)
			}
			gotTx, mapped, err := stun.ParseResponse(buf[:n])
			if err != nil {
				return a, fmt.Errorf("stun.ParseResponse of %d bytes (% x): %w", n, buf[:n], err)
			}
			if gotTx != tx {
				return a, fmt.Errorf("answer for transaction %x, want %x", gotTx, tx)
			}
			a.mapped, a.size, a.rtt = mapped, n, time.Since(start)
			return a, nil
		}
	}
	if a.refused > 0 {
		return a, fmt.Errorf("%w within %v (sends: %d, refused: %d — is the port open?)", errNoAnswer, within, a.sends, a.refused)
	}
	return a, fmt.Errorf("%w within %v (sends: %d)", errNoAnswer, within, a.sends)
}

func checkSTUNBinding(conn *net.UDPConn, local netip.AddrPort) bool {
	a, err := stunExchange(conn, stun.NewTxID(), *flagTimeout)
	if err != nil {
		report("stun_binding", false, "%v -> %s: %v", local, *flagSTUN, err)
		return false
	}
	if a.mapped != local {
		report("stun_binding", false, "mapped address %v, want the local address %v", a.mapped, local)
		return false
	}
	report("stun_binding", true, "%v -> %s: mapped address %v = local address; %d-byte answer in %v (sends: %d)",
		local, *flagSTUN, a.mapped, a.size, a.rtt.Round(time.Microsecond), a.sends)
	return true
}

// plainBindingRequest is a minimal RFC 5389 Binding Request: the header only,
// no attributes (what a generic STUN client may send; derper ignores it).
func plainBindingRequest(tx stun.TxID) []byte {
	b := []byte{0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42}
	return append(b, tx[:]...)
}

func checkSTUNDropsNonTailscale(conn *net.UDPConn, local netip.AddrPort) {
	const check = "stun_drops_non_tailscale"
	for _, d := range [][]byte{plainBindingRequest(stun.NewTxID()), []byte("not a STUN message at all")} {
		if _, err := conn.Write(d); err != nil {
			report(check, false, "send: %v", err)
			return
		}
	}
	// Nothing may come back for those two; stunExchange fails on an answer
	// with another transaction id.
	buf := make([]byte, 64<<10)
	conn.SetReadDeadline(time.Now().Add(stunQuiet))
	if n, err := conn.Read(buf); err == nil {
		report(check, false, "got a %d-byte answer (% x) to a request without SOFTWARE tailnode/FINGERPRINT or to a non-STUN datagram", n, buf[:n])
		return
	} else if !errors.Is(err, os.ErrDeadlineExceeded) {
		report(check, false, "receive: %v", err)
		return
	}
	a, err := stunExchange(conn, stun.NewTxID(), *flagTimeout)
	if err == nil && a.mapped != local {
		err = fmt.Errorf("mapped address %v, want %v", a.mapped, local)
	}
	reportErr(check, err, "no answer within %v to a bare RFC 5389 Binding Request or to a non-STUN datagram; a Tailscale request after them answered (sends: %d)", stunQuiet, a.sends)
}

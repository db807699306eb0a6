package main

// Two-relay mode (-url2): client A on the relay at -url, client B on the
// relay at -url2, where the two relays are meshed (e.g. two nodes of a
// derpmesh cluster). Packets go both ways through the mesh; with
// -expect-no-health neither client may receive a Health frame with a
// problem; with -wait-restarting the parent stops the -url relay and A must
// receive a Restarting frame. Handshake with the parent for that step:
//
//  1. derpinterop prints the check line "restart_ready" (ok) and reads stdin;
//  2. the parent sends SIGTERM to the -url relay, then writes a line to stdin;
//  3. derpinterop waits (-timeout) for Restarting on A, then pings B.

import (
	"bufio"
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"tailscale.com/types/key"
)

var (
	flagURL2           = flag.String("url2", "", "second DERP server URL, meshed with -url: run the two-relay checks (client A on -url, B on -url2)")
	flagExpectNoHealth = flag.Bool("expect-no-health", false, "(-url2) fail if a client receives a Health frame with a problem before the restart step")
	flagHold           = flag.Duration("hold", 2*time.Second, "(-url2) how long to stay connected after the packet checks, watching for Health frames")
	flagWaitRestarting = flag.Bool("wait-restarting", false, "(-url2) print restart_ready, read a line from stdin (sent after the parent stopped the -url relay), then expect a Restarting frame on A")
)

// checkTwoNodeUsage rejects flag combinations the two-relay mode does not support.
func checkTwoNodeUsage() string {
	if *flagURL2 == "" {
		if *flagExpectNoHealth || *flagWaitRestarting {
			return "-expect-no-health and -wait-restarting need -url2"
		}
		return ""
	}
	return ""
}

// deliverMesh sends one token from -> to, resending every 100 ms until it
// arrives (the relays learn about each other's clients asynchronously).
func deliverMesh(check string, from, to *peer) bool {
	token := append([]byte("route-"), randBytes(16)...)
	start := time.Now()
	deadline := time.NewTimer(*flagTimeout)
	defer deadline.Stop()
	resend := time.NewTicker(100 * time.Millisecond)
	defer resend.Stop()
	sends := 0
	send := func() error { sends++; return from.c.Send(to.key(), token) }
	if err := send(); err != nil {
		report(check, false, "send: %v", err)
		return false
	}
	for {
		select {
		case ev := <-to.events:
			if ev.kind == "error" {
				report(check, false, "%s: connection error: %v", to.name, ev.err)
				return false
			}
			if ev.kind == "packet" && ev.src == from.key() && bytes.Equal(ev.data, token) {
				report(check, true, "%s->%s through the mesh after %v (%d sends)", from.name, to.name, time.Since(start).Round(time.Millisecond), sends)
				return true
			}
		case <-resend.C:
			if err := send(); err != nil {
				report(check, false, "send: %v", err)
				return false
			}
		case <-deadline.C:
			report(check, false, "no packet %s->%s within %v (%d sends)", from.name, to.name, *flagTimeout, sends)
			return false
		}
	}
}

// checkMeshPacket sends one packet and waits for exactly those bytes; other
// packets from the same source (late copies of route tokens) are skipped
// and counted.
func checkMeshPacket(check string, from, to *peer, size int) {
	payload := randBytes(size)
	if err := from.c.Send(to.key(), payload); err != nil {
		report(check, false, "send: %v", err)
		return
	}
	start := time.Now()
	var others []int
	err := to.waitFor(func(ev event) bool {
		if ev.kind != "packet" || ev.src != from.key() {
			return false
		}
		if bytes.Equal(ev.data, payload) {
			return true
		}
		others = append(others, len(ev.data))
		return false
	})
	if err != nil {
		report(check, false, "%v (other packets from %s, sizes: %v)", err, from.name, others)
		return
	}
	report(check, true, "%d bytes %s->%s through the mesh in %v", size, from.name, to.name, time.Since(start).Round(time.Microsecond))
}

func runTwoNodes() {
	var all []*peer
	defer func() {
		for _, p := range all {
			p.c.Close()
		}
	}()
	a, err := newPeerURL("A", *flagURL, key.DERPMesh{}, false)
	if err != nil {
		report("two_node_handshake", false, "A: %v", err)
		return
	}
	all = append(all, a)
	b, err := newPeerURL("B", *flagURL2, key.DERPMesh{}, false)
	if err != nil {
		report("two_node_handshake", false, "B: %v", err)
		return
	}
	all = append(all, b)

	start := time.Now()
	var infos []string
	for _, p := range []*peer{a, b} {
		si, err := p.connectReady()
		if err != nil {
			report("two_node_handshake", false, "%v", err)
			return
		}
		infos = append(infos, fmt.Sprintf("%s=%s (server key %s, ServerInfo %s)",
			p.name, short(p.key()), p.c.ServerPublicKey().ShortString(), si))
	}
	report("two_node_handshake", true, "connected in %v: %s", time.Since(start).Round(time.Millisecond), strings.Join(infos, "; "))

	// https URLs: derphttp really spoke TLS and verified the server (against -ca-file).
	// With -websocket the trust comes from the system roots (SSL_CERT_FILE).
	if (isHTTPS(*flagURL) || isHTTPS(*flagURL2)) && !checkTLS(a, b) {
		return
	}
	checkWebsocketTransport(all, "")

	// Packets both ways through the mesh. If the mesh does not route, the
	// Health check still runs: a relay's Health frame may say why.
	meshOK := deliverMesh("mesh_route_a_to_b", a, b) && deliverMesh("mesh_route_b_to_a", b, a)
	if meshOK {
		for _, n := range packetSizes() {
			checkMeshPacket(fmt.Sprintf("mesh_packet_a_to_b_%d", n), a, b, n)
			checkMeshPacket(fmt.Sprintf("mesh_packet_b_to_a_%d", n), b, a, n)
		}
	}

	if *flagExpectNoHealth {
		// Stay connected a while: a relay refreshes Health on its own schedule.
		time.Sleep(*flagHold)
		var problems, counts []string
		for _, p := range []*peer{a, b} {
			frames := p.healthFrames()
			counts = append(counts, fmt.Sprintf("%s: %d", p.name, len(frames)))
			for _, f := range frames {
				if f != "" {
					problems = append(problems, fmt.Sprintf("%s: %q", p.name, f))
				}
			}
		}
		if len(problems) > 0 {
			report("no_health_problem", false, "Health frames with a problem: %s", strings.Join(problems, "; "))
		} else {
			report("no_health_problem", true, "no Health frame with a problem in %v after the packets (Health frames, all healthy: %s)",
				time.Since(start).Round(time.Millisecond), strings.Join(counts, ", "))
		}
	}

	if !meshOK || !*flagWaitRestarting {
		return
	}
	report("restart_ready", true, "stop the relay at %s (SIGTERM), then write a line to stdin", *flagURL)
	if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
		report("restarting_frame", false, "stdin: %v before the parent's line", err)
		return
	}
	t0 := time.Now()
	var desc string
	err = a.waitFor(func(ev event) bool {
		desc = ev.desc
		return ev.kind == "restarting"
	})
	if !reportErr("restarting_frame", err, "A got Restarting (%s) %v after the parent's line", desc, time.Since(t0).Round(time.Millisecond)) {
		return
	}

	// The other relay keeps serving B.
	var unexpected []string
drain:
	for {
		select {
		case ev := <-b.events:
			if ev.kind == "error" {
				unexpected = append(unexpected, fmt.Sprintf("connection error: %v", ev.err))
			} else if ev.kind == "restarting" {
				unexpected = append(unexpected, "Restarting "+ev.desc)
			}
		default:
			break drain
		}
	}
	if len(unexpected) > 0 {
		report("other_node_unaffected", false, "B: %s", strings.Join(unexpected, "; "))
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), *flagTimeout)
	defer cancel()
	t1 := time.Now()
	err = b.c.Ping(ctx)
	reportErr("other_node_unaffected", err, "B (on %s) still connected: pong in %v", *flagURL2, time.Since(t1).Round(time.Microsecond))
}

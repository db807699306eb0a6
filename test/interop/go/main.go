// Command derpinterop checks a DERP server with Tailscale's own DERP client
// (tailscale.com/derp/derphttp). It prints one JSON line per check on stdout:
//
//	{"check":"...","ok":true,"detail":"..."}
//
// and exits 0 only if every check passed (1 if any failed, 2 on bad usage).
// Every step is bounded by -timeout and the whole run by -overall-timeout.
//
// With -url2 it runs the two-relay checks of twonode.go instead (one client
// on each relay of a mesh; see there). With -stun it also (or, without -url,
// only) checks the server's STUN port with tailscale.com/net/stun (stun.go).
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"
)

var (
	flagURL       = flag.String("url", "", "DERP server URL, e.g. http://127.0.0.1:3340/derp (required unless -stun is given)")
	flagMeshKey   = flag.String("mesh-key", "", "server mesh key, 64 hex digits (required for the watch checks)")
	flagWebsocket = flag.Bool("websocket", false, "connect every client over WebSocket (binary must be built with -tags ts_debug_websockets)")
	flagTimeout   = flag.Duration("timeout", 10*time.Second, "timeout for each step")
	flagOverall   = flag.Duration("overall-timeout", 2*time.Minute, "hard limit for the whole run")
	flagVerbose   = flag.Bool("v", false, "log derphttp client messages to stderr")
	flagCAFile    = flag.String("ca-file", "", "PEM CA certificate(s) trusted for https URLs besides the system roots (private CA)")
)

// ---- output ----

type result struct {
	Check  string `json:"check"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
}

var (
	outMu   sync.Mutex
	enc     = newEncoder()
	failed  bool
	nChecks int
)

func report(check string, ok bool, format string, args ...any) {
	outMu.Lock()
	defer outMu.Unlock()
	nChecks++
	if !ok {
		failed = true
	}
	enc.Encode(result{Check: check, OK: ok, Detail: fmt.Sprintf(format, args...)})
}

func reportErr(check string, err error, okDetail string, args ...any) bool {
	if err != nil {
		report(check, false, "%v", err)
		return false
	}
	report(check, true, okDetail, args...)
	return true
}

// ---- client wrapper ----

type event struct {
	kind   string // packet, peer_present, peer_gone, server_info, other, error
	src    key.NodePublic
	data   []byte
	reason derp.PeerGoneReasonType
	flags  derp.PeerPresentFlags
	ipPort netip.AddrPort
	err    error
	desc   string
}

type peer struct {
	name   string
	c      *derphttp.Client
	events chan event
	logs   *logBuf
	ws     bool                 // dial over WebSocket
	wsTLS  *tls.ConnectionState // TLS state of the WebSocket handshake (https URLs)

	healthMu sync.Mutex
	health   []string // Problem of every Health frame received, "" = healthy
}

func (p *peer) healthFrames() []string {
	p.healthMu.Lock()
	defer p.healthMu.Unlock()
	return append([]string(nil), p.health...)
}

type logBuf struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *logBuf) logf(name string) func(string, ...any) {
	return func(format string, args ...any) {
		s := fmt.Sprintf(format, args...)
		l.mu.Lock()
		l.b.WriteString(s)
		l.b.WriteByte('\n')
		l.mu.Unlock()
		if *flagVerbose {
			log.Printf("[%s] %s", name, s)
		}
	}
}

func (l *logBuf) contains(s string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Contains(l.b.String(), s)
}

var netMon = netmon.NewStatic()

// tlsConfig is nil (system roots) unless -ca-file is given.
var tlsConfig *tls.Config

func loadCAFile(path string) error {
	pem, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return fmt.Errorf("%s: no PEM certificate found", path)
	}
	// derphttp passes this to tlsdial.Config, which tries these roots after
	// the system ones.
	tlsConfig = &tls.Config{RootCAs: pool}
	return nil
}

// wsTLSRecorder sits in http.DefaultClient, which derphttp's WebSocket
// dialer (coder/websocket with no HTTPClient) uses: it passes every request
// to http.DefaultTransport unchanged and keeps the TLS state of the last
// response, so the checks can tell that a WebSocket connection is TLS.
// That dialer gets no TLS config from derphttp: it trusts the system roots
// only (on Linux, SSL_CERT_FILE / SSL_CERT_DIR), never -ca-file.
type wsTLSRecorder struct {
	mu   sync.Mutex
	last *tls.ConnectionState
}

var wsTLS = new(wsTLSRecorder)

func (r *wsTLSRecorder) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := http.DefaultTransport.RoundTrip(req)
	if resp != nil {
		r.mu.Lock()
		r.last = resp.TLS
		r.mu.Unlock()
	}
	return resp, err
}

func (r *wsTLSRecorder) take() *tls.ConnectionState {
	r.mu.Lock()
	defer r.mu.Unlock()
	cs := r.last
	r.last = nil
	return cs
}

func isHTTPS(url string) bool { return strings.HasPrefix(url, "https:") }

// describeTLS says how p's connection is secured: the derphttp TLS state
// (TCP), or the WebSocket handshake's response (-websocket).
func describeTLS(p *peer) (string, error) {
	cs, ok := p.c.TLSConnectionState()
	via := ""
	if p.ws {
		cs, ok = p.wsTLS, p.wsTLS != nil
		via = "WebSocket over "
	}
	if !ok || cs == nil {
		return "", fmt.Errorf("%s: not a TLS connection", p.name)
	}
	if !cs.HandshakeComplete {
		return "", fmt.Errorf("%s: TLS handshake not complete", p.name)
	}
	issuer := "?"
	if len(cs.PeerCertificates) > 0 {
		issuer = cs.PeerCertificates[0].Issuer.CommonName
	}
	verified := ""
	if p.ws {
		// crypto/tls verified the chain against the system roots.
		if len(cs.VerifiedChains) == 0 {
			return "", fmt.Errorf("%s: WebSocket TLS connection without a verified chain", p.name)
		}
		chain := cs.VerifiedChains[0]
		verified = fmt.Sprintf(", chain verified to %q (system roots)", chain[len(chain)-1].Subject.CommonName)
	}
	return fmt.Sprintf("%s: %s%s, cert issued by %q%s", p.name, via, tls.VersionName(cs.Version), issuer, verified), nil
}

// checkTLS reports tls_connection for peers connected to https URLs.
func checkTLS(peers ...*peer) bool {
	var details, problems []string
	for _, p := range peers {
		d, err := describeTLS(p)
		if err != nil {
			problems = append(problems, err.Error())
		} else {
			details = append(details, d)
		}
	}
	if len(problems) > 0 {
		report("tls_connection", false, "%s", strings.Join(problems, "; "))
		return false
	}
	report("tls_connection", true, "%s", strings.Join(details, "; "))
	return true
}

// caInSSLCertFile checks that every certificate of caFile is also in the
// file SSL_CERT_FILE names, so WebSocket connections trust the same CA.
func caInSSLCertFile(caFile string) error {
	sys := os.Getenv("SSL_CERT_FILE")
	if sys == "" {
		return errors.New("SSL_CERT_FILE is not set")
	}
	ders := func(path string) ([][]byte, error) {
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, err
		}
		var out [][]byte
		for {
			var blk *pem.Block
			blk, b = pem.Decode(b)
			if blk == nil {
				return out, nil
			}
			if blk.Type == "CERTIFICATE" {
				out = append(out, blk.Bytes)
			}
		}
	}
	want, err := ders(caFile)
	if err != nil {
		return err
	}
	have, err := ders(sys)
	if err != nil {
		return fmt.Errorf("SSL_CERT_FILE: %w", err)
	}
	for _, w := range want {
		found := false
		for _, h := range have {
			found = found || bytes.Equal(w, h)
		}
		if !found {
			return fmt.Errorf("SSL_CERT_FILE=%s lacks a certificate of %s", sys, caFile)
		}
	}
	return nil
}

func newPeer(name string, meshKey key.DERPMesh, watch bool) (*peer, error) {
	return newPeerURL(name, *flagURL, meshKey, watch)
}

func newPeerURL(name, url string, meshKey key.DERPMesh, watch bool) (*peer, error) {
	p := &peer{name: name, events: make(chan event, 4096), logs: new(logBuf)}
	c, err := derphttp.NewClient(key.NewNode(), url, p.logs.logf(name), netMon)
	if err != nil {
		return nil, err
	}
	c.TLSConfig = tlsConfig
	c.MeshKey = meshKey
	c.WatchConnectionChanges = watch
	p.c = c
	// derphttp's WebSocket dial path never sends WatchConns, so watchers
	// always use plain DERP-over-HTTP.
	p.ws = *flagWebsocket && !watch
	return p, nil
}

func (p *peer) key() key.NodePublic { return p.c.SelfPublicKey() }

func (p *peer) connect() error {
	ctx, cancel := context.WithTimeout(context.Background(), *flagTimeout)
	defer cancel()
	// derphttp reads TS_DEBUG_DERP_WS_CLIENT (via envknob) on every dial.
	// Connections are only made here (the receive loop stops at the first
	// error instead of reconnecting), one at a time, so toggling it is safe.
	if p.ws {
		os.Setenv("TS_DEBUG_DERP_WS_CLIENT", "true")
		wsTLS.take()
	} else {
		os.Unsetenv("TS_DEBUG_DERP_WS_CLIENT")
	}
	if err := p.c.Connect(ctx); err != nil {
		return fmt.Errorf("%s: connect: %w", p.name, err)
	}
	if p.ws {
		p.wsTLS = wsTLS.take()
	}
	return nil
}

// startRecv reads messages until the first error (it does not let derphttp
// silently reconnect) and turns them into events.
func (p *peer) startRecv() {
	go func() {
		for {
			m, err := p.c.Recv()
			if err != nil {
				p.events <- event{kind: "error", err: err}
				return
			}
			switch m := m.(type) {
			case derp.ReceivedPacket:
				p.events <- event{kind: "packet", src: m.Source, data: bytes.Clone(m.Data)}
			case derp.PeerPresentMessage:
				p.events <- event{kind: "peer_present", src: m.Key, flags: m.Flags, ipPort: m.IPPort}
			case derp.PeerGoneMessage:
				p.events <- event{kind: "peer_gone", src: m.Peer, reason: m.Reason}
			case derp.ServerInfoMessage:
				p.events <- event{kind: "server_info", desc: fmt.Sprintf("%+v", m)}
			case derp.HealthMessage:
				p.healthMu.Lock()
				p.health = append(p.health, m.Problem)
				p.healthMu.Unlock()
				p.events <- event{kind: "health", desc: m.Problem}
			case derp.ServerRestartingMessage:
				p.events <- event{kind: "restarting", desc: fmt.Sprintf("ReconnectIn=%v TryFor=%v", m.ReconnectIn, m.TryFor)}
			default:
				p.events <- event{kind: "other", desc: fmt.Sprintf("%T", m)}
			}
		}
	}()
}

var errTimeout = errors.New("timeout")

// connectReady connects, starts the receive loop and waits for the
// ServerInfo frame. The server registers a client before sending ServerInfo,
// so after this returns packets addressed to p are deliverable.
func (p *peer) connectReady() (serverInfo string, err error) {
	if err := p.connect(); err != nil {
		return "", err
	}
	p.startRecv()
	err = p.waitFor(func(ev event) bool {
		serverInfo = ev.desc
		return ev.kind == "server_info"
	})
	if err != nil {
		return "", fmt.Errorf("waiting for ServerInfo: %w", err)
	}
	return serverInfo, nil
}

// waitFor consumes events until done returns true (nil), an error event
// arrives, or the step timeout passes. Events for which done is false are
// skipped (but passed to done so it can accumulate state).
func (p *peer) waitFor(done func(event) bool) error {
	t := time.NewTimer(*flagTimeout)
	defer t.Stop()
	for {
		select {
		case ev := <-p.events:
			if ev.kind == "error" {
				return fmt.Errorf("%s: connection error: %v", p.name, ev.err)
			}
			if done(ev) {
				return nil
			}
		case <-t.C:
			return fmt.Errorf("%s: %w after %v", p.name, errTimeout, *flagTimeout)
		}
	}
}

func short(k key.NodePublic) string { return k.ShortString() }

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// ---- checks ----

// packetSizes: small, typical, large. Over WebSocket, Tailscale's client
// and derper both cap a WebSocket message at 32 KiB (coder/websocket's
// default read limit) and a DERP frame goes out as one message, so the large
// packet is 32000 bytes there.
func packetSizes() []int {
	if *flagWebsocket {
		return []int{16, 1400, 32000}
	}
	return []int{16, 1400, 64 << 10}
}

func checkPacket(check string, from, to *peer, size int) {
	payload := randBytes(size)
	if err := from.c.Send(to.key(), payload); err != nil {
		report(check, false, "send: %v", err)
		return
	}
	start := time.Now()
	var got []byte
	err := to.waitFor(func(ev event) bool {
		if ev.kind == "packet" && ev.src == from.key() {
			got = ev.data
			return true
		}
		return false
	})
	if err != nil {
		report(check, false, "%v", err)
		return
	}
	if !bytes.Equal(got, payload) {
		report(check, false, "payload mismatch: sent %d bytes, got %d bytes", size, len(got))
		return
	}
	report(check, true, "%d bytes %s->%s in %v", size, from.name, to.name, time.Since(start).Round(time.Microsecond))
}

func main() {
	flag.Parse()
	log.SetFlags(log.Lmicroseconds)
	if !*flagVerbose {
		log.SetOutput(io.Discard) // derphttp's websocket dialer uses the global logger
	}
	if *flagURL == "" && *flagSTUN == "" {
		fmt.Fprintln(os.Stderr, "derpinterop: -url (or -stun) is required")
		flag.Usage()
		os.Exit(2)
	}
	var meshKey key.DERPMesh
	if *flagMeshKey != "" {
		var err error
		meshKey, err = key.ParseDERPMesh(*flagMeshKey)
		if err != nil {
			fmt.Fprintf(os.Stderr, "derpinterop: bad -mesh-key: %v\n", err)
			os.Exit(2)
		}
	}
	if *flagURL == "" && *flagURL2 != "" {
		fmt.Fprintln(os.Stderr, "derpinterop: -url2 needs -url")
		flag.Usage()
		os.Exit(2)
	}
	if msg := checkTwoNodeUsage(); msg != "" {
		fmt.Fprintf(os.Stderr, "derpinterop: %s\n", msg)
		flag.Usage()
		os.Exit(2)
	}
	if *flagWebsocket && *flagCAFile != "" {
		if err := caInSSLCertFile(*flagCAFile); err != nil {
			fmt.Fprintf(os.Stderr, "derpinterop: -websocket with -ca-file: %v; derphttp's WebSocket dialer ignores -ca-file (derphttp.Client.TLSConfig) and trusts only the system roots, which Go reads from SSL_CERT_FILE: set SSL_CERT_FILE=%s\n", err, *flagCAFile)
			flag.Usage()
			os.Exit(2)
		}
	}
	if *flagCAFile != "" {
		if err := loadCAFile(*flagCAFile); err != nil {
			fmt.Fprintf(os.Stderr, "derpinterop: bad -ca-file: %v\n", err)
			os.Exit(2)
		}
	}
	if *flagWebsocket {
		if !websocketCompiled {
			report("websocket_transport", false, "derpinterop was built without -tags ts_debug_websockets; derphttp cannot dial WebSocket")
			os.Exit(1)
		}
	}

	http.DefaultClient.Transport = wsTLS

	watchdog := time.AfterFunc(*flagOverall, func() {
		report("overall_timeout", false, "run exceeded -overall-timeout %v", *flagOverall)
		os.Exit(1)
	})
	defer watchdog.Stop()

	if *flagURL2 != "" {
		runTwoNodes()
	} else if *flagURL != "" {
		run(meshKey)
	}
	if *flagSTUN != "" {
		runSTUN()
	}

	if failed {
		os.Exit(1)
	}
}

func run(meshKey key.DERPMesh) {
	var all []*peer
	defer func() {
		for _, p := range all {
			p.c.Close()
		}
	}()
	mk := func(name string, mesh key.DERPMesh, watch bool) *peer {
		p, err := newPeer(name, mesh, watch)
		if err != nil {
			report("handshake", false, "%v", err)
			return nil
		}
		all = append(all, p)
		return p
	}

	// (a) handshake
	a, b := mk("A", key.DERPMesh{}, false), mk("B", key.DERPMesh{}, false)
	if a == nil || b == nil {
		return
	}
	start := time.Now()
	var serverInfo string
	for _, p := range []*peer{a, b} {
		si, err := p.connectReady()
		if err != nil {
			report("handshake", false, "%v", err)
			return
		}
		serverInfo = si
	}
	sa, sb := a.c.ServerPublicKey(), b.c.ServerPublicKey()
	if sa.IsZero() || sa != sb {
		report("handshake", false, "server public key zero or differs between connections: %v vs %v", sa, sb)
		return
	}
	report("handshake", true, "A=%s B=%s connected in %v; server key %s; ServerInfo %s",
		short(a.key()), short(b.key()), time.Since(start).Round(time.Millisecond), sa.String(), serverInfo)
	if isHTTPS(*flagURL) && !checkTLS(a, b) {
		return
	}

	// (b) packets
	// Over WebSocket, Tailscale's client and derper both cap a WebSocket
	// message at 32 KiB (coder/websocket's default read limit) and a DERP
	// frame goes out as one message, so the large packet is 32000 bytes there.
	for _, n := range packetSizes() {
		checkPacket(fmt.Sprintf("packet_a_to_b_%d", n), a, b, n)
		checkPacket(fmt.Sprintf("packet_b_to_a_%d", n), b, a, n)
	}
	checkPacket("packet_to_self", a, a, 100)

	// (c) ping -> pong (derphttp.Client.Ping matches the pong to the ping's 8 bytes).
	{
		ctx, cancel := context.WithTimeout(context.Background(), *flagTimeout)
		t0 := time.Now()
		err := a.c.Ping(ctx)
		cancel()
		reportErr("ping_pong", err, "pong in %v", time.Since(t0).Round(time.Microsecond))
	}

	// Disco-looking packet to an absent key: server answers PeerGone(not-here).
	{
		absent := key.NewNode().Public()
		pkt := append([]byte("TS\xf0\x9f\x92\xac"), randBytes(32+24+16)...)
		if err := a.c.Send(absent, pkt); err != nil {
			report("peer_gone_not_here", false, "send: %v", err)
		} else {
			var reason derp.PeerGoneReasonType
			err := a.waitFor(func(ev event) bool {
				if ev.kind == "peer_gone" && ev.src == absent {
					reason = ev.reason
					return true
				}
				return false
			})
			if err == nil && reason != derp.PeerGoneReasonNotHere {
				err = fmt.Errorf("PeerGone reason %d, want %d (not here)", reason, derp.PeerGoneReasonNotHere)
			}
			reportErr("peer_gone_not_here", err, "PeerGone(%s, not-here) for disco packet to absent peer", short(absent))
		}
	}

	// (d) watcher with the mesh key.
	if meshKey.IsZero() {
		report("watch_snapshot", false, "no -mesh-key given; watch checks not run")
		return
	}
	w := mk("W", meshKey, true)
	if w == nil {
		return
	}
	if _, err := w.connectReady(); err != nil {
		report("watch_snapshot", false, "%v", err)
		return
	}
	want := map[key.NodePublic]string{a.key(): "A", b.key(): "B", w.key(): "W(self)"}
	seen := map[key.NodePublic]event{}
	err := w.waitFor(func(ev event) bool {
		if ev.kind == "peer_present" {
			seen[ev.src] = ev
		}
		for k := range want {
			if _, ok := seen[k]; !ok {
				return false
			}
		}
		return true
	})
	if err != nil {
		var missing []string
		for k, n := range want {
			if _, ok := seen[k]; !ok {
				missing = append(missing, n)
			}
		}
		report("watch_snapshot", false, "%v; missing PeerPresent for %v", err, missing)
		return
	}
	report("watch_snapshot", true, "PeerPresent for A, B and W itself (%d present total)", len(seen))

	// Flags and addresses carried in PeerPresent.
	{
		var problems, info []string
		for k, n := range want {
			ev := seen[k]
			wantFlags := derp.PeerPresentFlags(derp.PeerPresentIsRegular)
			if k == w.key() {
				wantFlags = derp.PeerPresentIsMeshPeer
			}
			if ev.flags != wantFlags {
				problems = append(problems, fmt.Sprintf("%s flags=%#x want %#x", n, ev.flags, wantFlags))
			}
			info = append(info, fmt.Sprintf("%s=%v/%#x", n, ev.ipPort, ev.flags))
		}
		if len(problems) > 0 {
			report("watch_present_flags", false, "%s", strings.Join(problems, "; "))
		} else {
			report("watch_present_flags", true, "A,B regular(1), W mesh peer(2)")
		}
		problems = nil
		for k, n := range want {
			ev := seen[k]
			if !ev.ipPort.IsValid() {
				problems = append(problems, fmt.Sprintf("%s: no ip:port", n))
				continue
			}
			if *flagWebsocket {
				continue
			}
			p := map[string]*peer{"A": a, "B": b, "W(self)": w}[n]
			if la, err := p.c.LocalAddr(); err == nil {
				got := netip.AddrPortFrom(ev.ipPort.Addr().Unmap(), ev.ipPort.Port())
				exp := netip.AddrPortFrom(la.Addr().Unmap(), la.Port())
				if got != exp {
					problems = append(problems, fmt.Sprintf("%s: PeerPresent says %v, client local addr is %v", n, got, exp))
				}
			}
		}
		if len(problems) > 0 {
			report("watch_present_addr", false, "%s", strings.Join(problems, "; "))
		} else {
			report("watch_present_addr", true, "%s", strings.Join(info, " "))
		}
	}

	// A new client appearing after the snapshot is streamed to the watcher.
	c := mk("C", key.DERPMesh{}, false)
	if c == nil {
		return
	}
	if _, err := c.connectReady(); err != nil {
		report("watch_new_peer", false, "%v", err)
	} else {
		err := w.waitFor(func(ev event) bool { return ev.kind == "peer_present" && ev.src == c.key() })
		reportErr("watch_new_peer", err, "PeerPresent(C=%s) streamed after snapshot", short(c.key()))
	}

	// B leaves: watcher sees PeerGone(B); A (which received from B) sees PeerGone(B, disconnected).
	b.c.Close()
	{
		err := w.waitFor(func(ev event) bool { return ev.kind == "peer_gone" && ev.src == b.key() })
		reportErr("watch_peer_gone", err, "PeerGone(B=%s) after B closed", short(b.key()))
	}
	{
		var reason derp.PeerGoneReasonType
		err := a.waitFor(func(ev event) bool {
			if ev.kind == "peer_gone" && ev.src == b.key() {
				reason = ev.reason
				return true
			}
			return false
		})
		if err == nil && reason != derp.PeerGoneReasonDisconnected {
			err = fmt.Errorf("PeerGone reason %d, want %d (disconnected)", reason, derp.PeerGoneReasonDisconnected)
		}
		reportErr("peer_gone_to_receiver", err, "A got PeerGone(B, disconnected)")
	}

	// WatchConns without (or with a wrong) mesh key must be refused: the
	// server closes the connection.
	checkRefused := func(check string, mesh key.DERPMesh) {
		n := mk("N", mesh, true)
		if n == nil {
			return
		}
		if err := n.connect(); err != nil {
			report(check, true, "refused at connect: %v", err)
			return
		}
		n.startRecv()
		err := n.waitFor(func(ev event) bool {
			return ev.kind == "peer_present" || ev.kind == "peer_gone"
		})
		switch {
		case err == nil:
			report(check, false, "server sent watch events to a client without valid mesh key")
		case errors.Is(err, errTimeout):
			report(check, false, "server kept the connection open (%v)", err)
		default:
			report(check, true, "connection closed by server: %v", err)
		}
	}
	checkRefused("watch_refused_without_mesh_key", key.DERPMesh{})
	var wrong [32]byte
	rand.Read(wrong[:])
	wrongKey, _ := key.ParseDERPMesh(fmt.Sprintf("%x", wrong))
	checkRefused("watch_refused_wrong_mesh_key", wrongKey)

	// (e) websocket: confirm derphttp really used WebSocket for every client.
	checkWebsocketTransport(all, "; watchers used plain DERP (derphttp sends no WatchConns over WebSocket)")
}

func checkWebsocketTransport(all []*peer, note string) {
	if *flagWebsocket {
		var wsNames, notWS []string
		for _, p := range all {
			if !p.ws {
				continue
			}
			if p.logs.contains("connecting websocket to") {
				wsNames = append(wsNames, p.name)
			} else {
				notWS = append(notWS, p.name)
			}
		}
		if len(notWS) > 0 {
			report("websocket_transport", false, "clients %v did not dial WebSocket", notWS)
		} else {
			report("websocket_transport", true, "clients %v dialed WebSocket (subprotocol derp)%s", wsNames, note)
		}
	}
}

func newEncoder() *json.Encoder {
	e := json.NewEncoder(os.Stdout)
	e.SetEscapeHTML(false)
	return e
}

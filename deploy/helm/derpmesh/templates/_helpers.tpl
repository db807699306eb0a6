{{/*
Chart name, or nameOverride; at most 63 characters (a DNS label).
*/}}
{{- define "derpmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Base name of the release's resources: fullnameOverride, else <release>-<name>,
or just <release> when the release name already contains the chart name.
*/}}
{{- define "derpmesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Value of the helm.sh/chart label: <chart>-<version>, "+" replaced (not allowed in labels).
*/}}
{{- define "derpmesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that select the release's pods (Deployment selector, Service selector,
anti-affinity). They must never change after the first install.
*/}}
{{- define "derpmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "derpmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels on every resource of the release.
*/}}
{{- define "derpmesh.labels" -}}
helm.sh/chart: {{ include "derpmesh.chart" . }}
{{ include "derpmesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Image reference: repository@digest when a digest is set, else repository:tag
(tag defaulting to the chart's appVersion).
*/}}
{{- define "derpmesh.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion (toString .Values.image.tag)) }}
{{- end }}
{{- end }}

{{/*
Name of the Secret holding the Postgres URL, and its key; empty when no
Postgres is configured (the pod then runs an embedded one).
*/}}
{{- define "derpmesh.postgresSecretName" -}}
{{- if .Values.postgres.existingSecret }}
{{- .Values.postgres.existingSecret }}
{{- else if .Values.postgres.url }}
{{- printf "%s-postgres" (include "derpmesh.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "derpmesh.postgresSecretKey" -}}
{{- if .Values.postgres.existingSecret }}
{{- required "postgres.existingSecretKey must name the key of the Postgres URL in postgres.existingSecret (default \"url\")" .Values.postgres.existingSecretKey }}
{{- else }}
{{- print "url" }}
{{- end }}
{{- end }}

{{/*
A duration in the server's syntax (a number with a unit ms, s, m or h) as
milliseconds. Called with (dict "name" "<values key>" "value" <value>); fails
naming the key when the value is not such a duration. The server would read a
bare number as milliseconds; the chart asks for the unit to rule out "5"
meaning 5 ms by mistake.
*/}}
{{- define "derpmesh.durationMs" -}}
{{- $text := toString .value | trim }}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?(ms|s|m|h)$" $text) }}
{{- fail (printf "%s must be a duration: a number with a unit ms, s, m or h, like \"5s\", \"1500ms\" or \"1m\"; got %q" .name $text) }}
{{- end }}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $text }}
{{- $unit := trimPrefix $number $text }}
{{- $factor := get (dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000) $unit }}
{{- mulf (float64 $number) $factor }}
{{- end }}

{{/*
Checks the values; a misconfiguration fails rendering with a message saying
what to set. Included by the Deployment, so `helm install`, `helm template`
and `helm lint` all run it.
*/}}
{{- define "derpmesh.validate" -}}
{{- $v := .Values }}
{{- if not $v.accessURL }}
{{- fail "accessURL is required: set it to the load-balanced URL clients use to reach the relays (this chart's Service, or the LoadBalancer/Ingress in front of it), e.g. --set accessURL=https://derp.example.com" }}
{{- end }}
{{- if not (regexMatch "^https?://[^/\\s]+" (toString $v.accessURL)) }}
{{- fail (printf "accessURL must be an http:// or https:// URL like https://derp.example.com; got %q" (toString $v.accessURL)) }}
{{- end }}
{{- $replicas := int $v.replicaCount }}
{{- if lt $replicas 0 }}
{{- fail (printf "replicaCount must be 0 or more; got %v" $v.replicaCount) }}
{{- end }}
{{- if and $v.postgres.existingSecret $v.postgres.url }}
{{- fail "postgres.existingSecret and postgres.url are both set: set only one (existingSecret names a Secret you manage; url makes the chart create one)" }}
{{- end }}
{{- if and (gt $replicas 1) (not $v.postgres.existingSecret) (not $v.postgres.url) }}
{{- fail (printf "replicaCount is %d but no Postgres is configured: set postgres.existingSecret (a Secret holding the connection URL under postgres.existingSecretKey, default \"url\") or postgres.url. The pods find each other and mesh their relays only through one shared Postgres; without it each pod would start its own embedded Postgres and they would not form a cluster. (replicaCount=1 may run without one, on an embedded Postgres.)" $replicas) }}
{{- end }}
{{- $port := int $v.containerPort }}
{{- if or (lt $port 1) (gt $port 65535) }}
{{- fail (printf "containerPort must be a port number from 1 to 65535; got %v" $v.containerPort) }}
{{- end }}
{{- $graceMs := include "derpmesh.durationMs" (dict "name" "shutdownGrace" "value" $v.shutdownGrace) | float64 }}
{{- $drainMs := include "derpmesh.durationMs" (dict "name" "shutdownDrainDelay" "value" $v.shutdownDrainDelay) | float64 }}
{{- $preStop := int $v.preStopSleepSeconds }}
{{- if lt $preStop 0 }}
{{- fail (printf "preStopSleepSeconds must be 0 (no preStop hook) or more; got %v" $v.preStopSleepSeconds) }}
{{- end }}
{{- $neededMs := addf (mulf $preStop 1000) $drainMs $graceMs 2000 }}
{{- $terminationMs := mulf (int $v.terminationGracePeriodSeconds) 1000 }}
{{- if le $terminationMs $neededMs }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be longer than preStopSleepSeconds (%d) + shutdownDrainDelay (%s) + shutdownGrace (%s) plus 2s for closing the Postgres pool, or Kubernetes kills pods in the middle of their graceful shutdown: raise terminationGracePeriodSeconds to at least %d, or lower the others" $v.terminationGracePeriodSeconds $preStop (toString $v.shutdownDrainDelay) (toString $v.shutdownGrace) (add1 (int (floor (divf $neededMs 1000))))) }}
{{- end }}
{{- $pdb := $v.podDisruptionBudget }}
{{- $minSet := not (or (kindIs "invalid" $pdb.minAvailable) (eq (toString $pdb.minAvailable) "")) }}
{{- $maxSet := not (or (kindIs "invalid" $pdb.maxUnavailable) (eq (toString $pdb.maxUnavailable) "")) }}
{{- if and $pdb.enabled $minSet $maxSet }}
{{- fail "podDisruptionBudget: set minAvailable or maxUnavailable, not both (e.g. --set podDisruptionBudget.minAvailable=2 --set podDisruptionBudget.maxUnavailable=null)" }}
{{- end }}
{{- if and $pdb.enabled (not $minSet) (not $maxSet) }}
{{- fail "podDisruptionBudget.enabled is true but neither minAvailable nor maxUnavailable is set: set one (e.g. maxUnavailable=1), or podDisruptionBudget.enabled=false" }}
{{- end }}
{{- if and $pdb.enabled (gt $replicas 1) $minSet (regexMatch "^[0-9]+$" (toString $pdb.minAvailable)) }}
{{- if ge (int $pdb.minAvailable) $replicas }}
{{- fail (printf "podDisruptionBudget.minAvailable (%v) is not below replicaCount (%d): no pod could ever be evicted and node drains would block; lower it or use maxUnavailable" $pdb.minAvailable $replicas) }}
{{- end }}
{{- end }}
{{- $_ := include "derpmesh.durationMs" (dict "name" "heartbeatInterval" "value" $v.heartbeatInterval) }}
{{- $_ = include "derpmesh.durationMs" (dict "name" "latencyThreshold" "value" $v.latencyThreshold) }}
{{- with $v.metrics.prometheusRule }}
{{- if .peerSlowThreshold }}
{{- $_ = include "derpmesh.durationMs" (dict "name" "metrics.prometheusRule.peerSlowThreshold" "value" .peerSlowThreshold) }}
{{- end }}
{{- if .databaseSlowThreshold }}
{{- $_ = include "derpmesh.durationMs" (dict "name" "metrics.prometheusRule.databaseSlowThreshold" "value" .databaseSlowThreshold) }}
{{- end }}
{{- end }}
{{- if not (has (toString $v.log.format) (list "json" "text")) }}
{{- fail (printf "log.format must be json or text; got %q" (toString $v.log.format)) }}
{{- end }}
{{- if not (has (toString $v.log.level) (list "debug" "info" "warn" "error")) }}
{{- fail (printf "log.level must be debug, info, warn or error; got %q" (toString $v.log.level)) }}
{{- end }}
{{- if lt (int $v.regionID) 1 }}
{{- fail (printf "regionID must be a positive integer; got %v" $v.regionID) }}
{{- end }}
{{- end }}

{{/*
A duration value (the server's syntax) in seconds, for PromQL: (dict "name" "<values key>" "value" <value>).
*/}}
{{- define "derpmesh.durationSeconds" -}}
{{- divf (include "derpmesh.durationMs" . | float64) 1000 }}
{{- end }}

{{/*
Series selector of this release's metrics in the PrometheusRule: metrics.prometheusRule.selector, or
the namespace and the job name a ServiceMonitor gives (the Service's name).
*/}}
{{- define "derpmesh.ruleSelector" -}}
{{- if .Values.metrics.prometheusRule.selector }}
{{- .Values.metrics.prometheusRule.selector }}
{{- else }}
{{- printf "namespace=%q,job=%q" .Release.Namespace (include "derpmesh.fullname" .) }}
{{- end }}
{{- end }}

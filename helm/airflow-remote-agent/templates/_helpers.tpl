{{/*
Names, labels and the pod template shared by every component.
*/}}

{{/* The chart name, for the app.kubernetes.io/name label. */}}
{{- define "airflow-remote-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every resource name: the release name, followed by the chart name unless it holds it. */}}
{{- define "airflow-remote-agent.fullname" -}}
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

{{/* chart-version, for the helm.sh/chart label. */}}
{{- define "airflow-remote-agent.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The name of one component's resources; Services need a DNS label, so a name over 63 characters fails
instead of being cut (two cut names could collide). Takes (dict "root" $ "suffix" "worker-gpu").
*/}}
{{- define "airflow-remote-agent.componentName" -}}
{{- $name := printf "%s-%s" (include "airflow-remote-agent.fullname" .root) .suffix }}
{{- if gt (len $name) 63 }}
{{- fail (printf "the resource name %q is longer than 63 characters: shorten the release name, fullnameOverride or the worker group's name" $name) }}
{{- end }}
{{- $name }}
{{- end }}

{{/* Selector labels. Takes (dict "root" $ "component" "worker" "group" "gpu"); group is for workers. */}}
{{- define "airflow-remote-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "airflow-remote-agent.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- if .group }}
airflow-remote-agent/worker-group: {{ .group }}
{{- end }}
{{- end }}

{{/* Every label. Takes the same dict as selectorLabels; without a component, the release's common labels. */}}
{{- define "airflow-remote-agent.labels" -}}
helm.sh/chart: {{ include "airflow-remote-agent.chart" .root }}
{{- if .component }}
{{ include "airflow-remote-agent.selectorLabels" . }}
{{- else }}
app.kubernetes.io/name: {{ include "airflow-remote-agent.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end }}
app.kubernetes.io/version: {{ .root.Values.image.tag | default .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: airflow-remote-agent
{{- end }}

{{/* The fewest pods a worker group runs: its replicas, or with autoscaling its minReplicaCount. */}}
{{- define "airflow-remote-agent.minPods" -}}
{{- $autoscaling := .autoscaling | default dict }}
{{- if $autoscaling.enabled }}
{{- ternary $autoscaling.minReplicaCount 0 (hasKey $autoscaling "minReplicaCount") | int }}
{{- else }}
{{- ternary .replicas 1 (hasKey . "replicas") | int }}
{{- end }}
{{- end }}

{{/* The service account the pods run as. */}}
{{- define "airflow-remote-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "airflow-remote-agent.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Fail unless exactly one token source is set: a token from two places would leave it unclear which the
agents use, and no token at all would only show as a crash loop.
*/}}
{{- define "airflow-remote-agent.validateToken" -}}
{{- $sources := list }}
{{- if .Values.token.value }}{{ $sources = append $sources "token.value" }}{{ end }}
{{- if .Values.token.existingSecret }}{{ $sources = append $sources "token.existingSecret" }}{{ end }}
{{- if .Values.token.file }}{{ $sources = append $sources "token.file" }}{{ end }}
{{- if eq (len $sources) 0 }}
{{- fail "token: set exactly one of token.value, token.existingSecret or token.file; none is set" }}
{{- else if gt (len $sources) 1 }}
{{- fail (printf "token: set exactly one of token.value, token.existingSecret or token.file; %s are all set (clear the others, e.g. --set token.existingSecret=null)" (join ", " $sources)) }}
{{- end }}
{{- end }}

{{/* The Secret holding the token, when the token comes from a Secret. */}}
{{- define "airflow-remote-agent.tokenSecretName" -}}
{{- if .Values.token.existingSecret }}
{{- .Values.token.existingSecret }}
{{- else }}
{{- include "airflow-remote-agent.fullname" . }}-token
{{- end }}
{{- end }}

{{/* The key of that Secret holding the token. */}}
{{- define "airflow-remote-agent.tokenSecretKey" -}}
{{- if .Values.token.existingSecret }}
{{- default "token" .Values.token.existingSecretKey }}
{{- else }}
{{- print "token" }}
{{- end }}
{{- end }}

{{/* Where the agents read the token. */}}
{{- define "airflow-remote-agent.tokenPath" -}}
{{- default "/var/run/airflow-remote-agent/token" .Values.token.file }}
{{- end }}

{{/* The image reference. */}}
{{- define "airflow-remote-agent.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/* The orchestrator's base URL without a trailing slash. */}}
{{- define "airflow-remote-agent.apiUrl" -}}
{{- required "orchestrator.url is required, e.g. https://airflow.mycorp.com" .Values.orchestrator.url | trimSuffix "/" }}
{{- end }}

{{/* The DAG bundle list as JSON, for Airflow's [dag_processor] dag_bundle_config_list. */}}
{{- define "airflow-remote-agent.bundleJson" -}}
{{- toJson .Values.dagBundleConfigList }}
{{- end }}

{{/* The flags every component takes: how to reach the orchestrator, its health port, its log format. */}}
{{- define "airflow-remote-agent.connectionArgs" -}}
- {{ printf "--api-url=%s" (include "airflow-remote-agent.apiUrl" .) | quote }}
- {{ printf "--token-file=%s" (include "airflow-remote-agent.tokenPath" .) | quote }}
- {{ printf "--health-port=%d" (int .Values.healthPort) | quote }}
- {{ printf "--log-format=%s" .Values.logFormat | quote }}
{{- if .Values.orchestrator.allowInsecureHttp }}
- "--allow-insecure-http"
{{- end }}
{{- end }}

{{/* The secrets backend flag, for every component that runs user code. */}}
{{- define "airflow-remote-agent.secretsArgs" -}}
{{- if .Values.secrets.backend }}
- {{ printf "--secrets-backend=%s" .Values.secrets.backend | quote }}
{{- end }}
{{- end }}

{{/* Probe timings: the values' settings over the handler every probe shares. */}}
{{- define "airflow-remote-agent.probe" -}}
httpGet:
  path: {{ .path }}
  port: health
{{- with .settings }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The pod template of one component. Takes (dict "root" $ "component" "worker" "group" "gpu" "config" $cfg
"args" $argsYaml "env" $envYaml "terminationGracePeriodSeconds" 330): args and env are YAML lists
already rendered.
*/}}
{{- define "airflow-remote-agent.podTemplate" -}}
{{- $root := .root }}
{{- $values := $root.Values }}
{{- $cfg := .config -}}
metadata:
  labels:
    {{- include "airflow-remote-agent.labels" . | nindent 4 }}
    {{- with $values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- $annotations := dict }}
  {{- if $values.token.value }}
  {{- /* Pods restart when the chart's token changes. */}}
  {{- $_ := set $annotations "checksum/token" (sha256sum (printf "%s/%s" $root.Release.Name $values.token.value)) }}
  {{- end }}
  {{- if $values.metrics.enabled }}
  {{- $_ := set $annotations "prometheus.io/scrape" "true" }}
  {{- $_ := set $annotations "prometheus.io/port" ($values.healthPort | int | toString) }}
  {{- $_ := set $annotations "prometheus.io/path" "/metrics" }}
  {{- end }}
  {{- $annotations = mergeOverwrite $annotations ($values.podAnnotations | default dict) }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "airflow-remote-agent.serviceAccountName" $root }}
  automountServiceAccountToken: {{ $values.serviceAccount.automountToken }}
  {{- with $values.image.pullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $values.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if .terminationGracePeriodSeconds }}
  terminationGracePeriodSeconds: {{ .terminationGracePeriodSeconds }}
  {{- end }}
  {{- with $cfg.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $cfg.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $cfg.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .component }}
      image: {{ include "airflow-remote-agent.image" $root | quote }}
      imagePullPolicy: {{ $values.image.pullPolicy }}
      args:
        {{- .args | nindent 8 }}
      env:
        # Unique per pod: the orchestrator tracks each agent by name.
        - name: AIRFLOW_REMOTE_AGENT_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: AIRFLOW_HOME
          value: /opt/airflow
        # Airflow writes a default airflow.cfg at start when there is none: a writable volume, as the
        # root filesystem is read-only. Configure Airflow with AIRFLOW__SECTION__KEY variables.
        - name: AIRFLOW_CONFIG
          value: /opt/airflow/runtime/airflow.cfg
        {{- if and $values.secrets.backendKwargs (ne .component "sentinel") }}
        - name: AIRFLOW__WORKERS__SECRETS_BACKEND_KWARGS
          value: {{ toJson $values.secrets.backendKwargs | quote }}
        {{- end }}
        {{- with .env }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- with $values.commonEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $cfg.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: health
          containerPort: {{ $values.healthPort | int }}
          protocol: TCP
      startupProbe:
        {{- include "airflow-remote-agent.probe" (dict "path" "/livez" "settings" $values.startupProbe) | nindent 8 }}
      livenessProbe:
        {{- include "airflow-remote-agent.probe" (dict "path" "/livez" "settings" $values.livenessProbe) | nindent 8 }}
      readinessProbe:
        {{- include "airflow-remote-agent.probe" (dict "path" "/healthz" "settings" $values.readinessProbe) | nindent 8 }}
      {{- with $cfg.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $values.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: logs
          mountPath: /opt/airflow/logs
        - name: runtime
          mountPath: /opt/airflow/runtime
        {{- if not $values.token.file }}
        - name: token
          mountPath: /var/run/airflow-remote-agent
          readOnly: true
        {{- end }}
        {{- with $values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: tmp
      {{- with $values.scratchVolumes.tmpSizeLimit }}
      emptyDir:
        sizeLimit: {{ . | quote }}
      {{- else }}
      emptyDir: {}
      {{- end }}
    - name: logs
      {{- with $values.scratchVolumes.logsSizeLimit }}
      emptyDir:
        sizeLimit: {{ . | quote }}
      {{- else }}
      emptyDir: {}
      {{- end }}
    - name: runtime
      emptyDir: {}
    {{- if not $values.token.file }}
    - name: token
      secret:
        secretName: {{ include "airflow-remote-agent.tokenSecretName" $root }}
        # Read by the pod's user only (with fsGroup set, the kubelet adds group read).
        defaultMode: 0400
        items:
          - key: {{ include "airflow-remote-agent.tokenSecretKey" $root }}
            path: token
    {{- end }}
    {{- with $values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* A ClusterIP Service on a component's health port: the sentinel polls /healthz through it. */}}
{{- define "airflow-remote-agent.healthService" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ .name }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "airflow-remote-agent.labels" . | nindent 4 }}
spec:
  type: ClusterIP
  # Unready pods stay behind the Service, so the sentinel reads their own 503 and its reason.
  publishNotReadyAddresses: true
  selector:
    {{- include "airflow-remote-agent.selectorLabels" . | nindent 4 }}
  ports:
    - name: health
      port: {{ .root.Values.healthPort | int }}
      targetPort: health
      protocol: TCP
{{- end }}

{{/* A PodDisruptionBudget for one component, when enabled. */}}
{{- define "airflow-remote-agent.pdb" -}}
{{- if .root.Values.podDisruptionBudget.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ .name }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "airflow-remote-agent.labels" . | nindent 4 }}
spec:
  maxUnavailable: {{ .root.Values.podDisruptionBudget.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "airflow-remote-agent.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end }}

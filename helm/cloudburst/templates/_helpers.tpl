{{/*
Names. The base name is at most 36 characters: KubeRay appends up to 17 to a RayJob's or
RayService's name for the clusters and Services it derives (RayJob and RayService names at
most 47, RayCluster names at most 53), and KubeRay names must start with a letter.
*/}}
{{- define "cloudburst.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 36 | trimSuffix "-" -}}
{{- end -}}

{{- define "cloudburst.fullname" -}}
{{- $name := "" -}}
{{- if .Values.fullnameOverride -}}
{{- $name = .Values.fullnameOverride -}}
{{- else -}}
{{- $base := default .Chart.Name .Values.nameOverride -}}
{{- if contains $base .Release.Name -}}
{{- $name = .Release.Name -}}
{{- else -}}
{{- $name = printf "%s-%s" .Release.Name $base -}}
{{- end -}}
{{- end -}}
{{- $name = $name | trunc 36 | trimSuffix "-" -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) -}}
{{- fail (printf "the base name %q must start with a letter and hold only a-z, 0-9 and '-' (KubeRay names are DNS-1035 labels); set fullnameOverride" $name) -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{- define "cloudburst.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cloudburst.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cloudburst.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cloudburst.labels" -}}
helm.sh/chart: {{ include "cloudburst.chart" . }}
{{ include "cloudburst.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cloudburst
{{- end -}}

{{- define "cloudburst.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "cloudburst.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name: name the existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "cloudburst.rayClusterName" -}}
{{- include "cloudburst.fullname" . -}}
{{- end -}}

{{- define "cloudburst.configMapName" -}}
{{- printf "%s-configs" (include "cloudburst.fullname" .) -}}
{{- end -}}

{{- define "cloudburst.requestsConfigMapName" -}}
{{- printf "%s-requests" (include "cloudburst.fullname" .) -}}
{{- end -}}

{{- define "cloudburst.mlflowName" -}}
{{- printf "%s-mlflow" (include "cloudburst.fullname" .) -}}
{{- end -}}

{{- define "cloudburst.postgresqlName" -}}
{{- printf "%s-postgresql" (include "cloudburst.fullname" .) -}}
{{- end -}}

{{/* Images. */}}
{{- define "cloudburst.cpuImage" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-cpu" .Chart.AppVersion) .Values.image.tag) -}}
{{- end -}}

{{- define "cloudburst.gpuImage" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-gpu" .Chart.AppVersion) .Values.image.gpuTag) -}}
{{- end -}}

{{- define "cloudburst.mlflowImage" -}}
{{- $repo := default .Values.image.repository .Values.mlflow.image.repository -}}
{{- $tag := default (default (printf "%s-cpu" .Chart.AppVersion) .Values.image.tag) .Values.mlflow.image.tag -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{/* Where job configs and ensemble requests are mounted in every Ray container. */}}
{{- define "cloudburst.configsPath" -}}/etc/cloudburst/configs{{- end -}}
{{- define "cloudburst.requestsPath" -}}/etc/cloudburst/requests{{- end -}}
{{- define "cloudburst.gcsKeyPath" -}}/var/run/secrets/cloudburst/gcs{{- end -}}

{{/* The MLflow tracking URI every Ray pod gets. */}}
{{- define "cloudburst.trackingUri" -}}
{{- if .Values.mlflow.enabled -}}
{{- printf "http://%s.%s.svc.cluster.local:%d" (include "cloudburst.mlflowName" .) .Release.Namespace (int .Values.mlflow.port) -}}
{{- else -}}
{{- required "mlflow.trackingUri: give the URI of an MLflow server when mlflow.enabled is false" .Values.mlflow.trackingUri -}}
{{- end -}}
{{- end -}}

{{/* Where MLflow keeps artifacts. */}}
{{- define "cloudburst.artifactsDestination" -}}
{{- if .Values.mlflow.artifactsDestination -}}
{{- .Values.mlflow.artifactsDestination -}}
{{- else -}}
{{- printf "%s://%s/mlflow" (ternary "gs" "s3" (eq .Values.storage.provider "gcs")) .Values.storage.bucket -}}
{{- end -}}
{{- end -}}

{{/*
Credentials and settings of the object store, for any container that reads or writes it:
plain settings as values, credentials only by Secret reference (or none: workload identity).
*/}}
{{- define "cloudburst.storageEnv" -}}
{{- $s := .Values.storage -}}
{{- if eq $s.provider "s3" }}
{{- with $s.s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
- name: AWS_REGION
  value: {{ . | quote }}
{{- end }}
{{- with $s.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $s.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $s.s3.secretAccessKeyKey }}
{{- end }}
{{- else }}
{{- with $s.gcs.project }}
- name: GOOGLE_CLOUD_PROJECT
  value: {{ . | quote }}
{{- end }}
{{- if $s.gcs.existingSecret }}
- name: GOOGLE_APPLICATION_CREDENTIALS
  value: {{ printf "%s/%s" (include "cloudburst.gcsKeyPath" .) $s.gcs.keyFileKey | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
The environment of every Ray container: Cloudburst's defaults for programs (the `import` and
`program` scopes of cloudburst.environment; the `local` and `emulator` ones are for a single
machine and would switch off cloud credentials), the tracking URI, the object store, the
user's extra variables and, on the endpoint's pods, the API key by reference.
*/}}
{{- define "cloudburst.rayEnv" -}}
{{- $root := .root -}}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: DO_NOT_TRACK
  value: "1"
- name: MLFLOW_DISABLE_TELEMETRY
  value: "true"
- name: GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT
  value: "false"
- name: MLFLOW_TRACKING_URI
  value: {{ include "cloudburst.trackingUri" $root | quote }}
{{- with $root.Values.storage.endpointUrl }}
- name: CLOUDBURST_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- include "cloudburst.storageEnv" $root }}
{{- range $name, $value := $root.Values.env }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- if .serve }}
- name: CLOUDBURST_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.serve.apiKey.existingSecret }}
      key: {{ $root.Values.serve.apiKey.key }}
{{- end }}
{{- end -}}

{{/* Volume mounts and volumes of every Ray container / pod. */}}
{{- define "cloudburst.rayVolumeMounts" -}}
- name: ray-logs
  mountPath: /tmp/ray
- name: configs
  mountPath: {{ include "cloudburst.configsPath" . }}
  readOnly: true
- name: requests
  mountPath: {{ include "cloudburst.requestsPath" . }}
  readOnly: true
{{- if and (eq .Values.storage.provider "gcs") .Values.storage.gcs.existingSecret }}
- name: gcs-key
  mountPath: {{ include "cloudburst.gcsKeyPath" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "cloudburst.rayVolumes" -}}
- name: ray-logs
  emptyDir:
    {{- if .Values.ray.tmpVolume.sizeLimit }}
    sizeLimit: {{ .Values.ray.tmpVolume.sizeLimit | quote }}
    {{- else }} {}
    {{- end }}
- name: configs
  configMap:
    name: {{ include "cloudburst.configMapName" . }}
- name: requests
  configMap:
    name: {{ include "cloudburst.requestsConfigMapName" . }}
    optional: true
{{- if and (eq .Values.storage.provider "gcs") .Values.storage.gcs.existingSecret }}
- name: gcs-key
  secret:
    secretName: {{ .Values.storage.gcs.existingSecret }}
{{- end }}
{{- end -}}

{{/*
The pod template of a Ray group. Arguments: root, kind (head | worker), image, resources,
gpus (0 for none), nodeSelector, tolerations, serve (endpoint pods).
*/}}
{{- define "cloudburst.rayPodTemplate" -}}
{{- $root := .root -}}
metadata:
  labels:
    {{- include "cloudburst.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ ternary "ray-head" "ray-worker" (eq .kind "head") }}
spec:
  serviceAccountName: {{ include "cloudburst.serviceAccountName" $root }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  {{- with .nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" (eq .kind "head") }}
      image: {{ .image }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- if eq .kind "head" }}
      ports:
        - name: gcs-server
          containerPort: 6379
        - name: dashboard
          containerPort: 8265
        - name: client
          containerPort: 10001
        - name: serve
          containerPort: {{ int $root.Values.serve.http.port }}
      {{- else if .serve }}
      ports:
        - name: serve
          containerPort: {{ int $root.Values.serve.http.port }}
      {{- end }}
      env:
        {{- include "cloudburst.rayEnv" (dict "root" $root "serve" .serve) | nindent 8 }}
      resources:
        {{- $res := deepCopy (default dict .resources) }}
        {{- if gt (int .gpus) 0 }}
        {{- $limits := default dict (get $res "limits") }}
        {{- $_ := set $limits "nvidia.com/gpu" (int .gpus) }}
        {{- $_ := set $res "limits" $limits }}
        {{- end }}
        {{- toYaml $res | nindent 8 }}
      volumeMounts:
        {{- include "cloudburst.rayVolumeMounts" $root | nindent 8 }}
  volumes:
    {{- include "cloudburst.rayVolumes" $root | nindent 4 }}
{{- end -}}

{{/*
A RayCluster spec (the long-lived RayCluster, a RayJob's own cluster, the RayService's).
Arguments: root, serve (true for the endpoint's cluster).
*/}}
{{- define "cloudburst.rayClusterSpec" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
rayVersion: {{ $v.ray.version | quote }}
enableInTreeAutoscaling: {{ $v.ray.autoscaling.enabled }}
{{- if $v.ray.autoscaling.enabled }}
autoscalerOptions:
  idleTimeoutSeconds: {{ int $v.ray.autoscaling.idleTimeoutSeconds }}
  upscalingMode: {{ $v.ray.autoscaling.upscalingMode }}
  {{- with $v.ray.autoscaling.version }}
  version: {{ . }}
  {{- end }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  resources:
    {{- toYaml $v.ray.autoscaling.resources | nindent 4 }}
{{- end }}
headGroupSpec:
  serviceType: {{ $v.head.serviceType }}
  rayStartParams:
    {{- $params := dict "dashboard-host" "0.0.0.0" }}
    {{- $params = merge $params (deepCopy $v.head.rayStartParams) }}
    {{- if not $v.head.schedulable }}
    {{- $_ := set $params "num-cpus" "0" }}
    {{- end }}
    {{- toYaml $params | nindent 4 }}
  template:
    {{- include "cloudburst.rayPodTemplate" (dict "root" $root "kind" "head" "image" (include "cloudburst.cpuImage" $root) "resources" $v.head.resources "gpus" 0 "nodeSelector" $v.head.nodeSelector "tolerations" $v.head.tolerations "serve" .serve) | nindent 4 }}
{{- $groups := list }}
{{- if $v.workers.cpu.enabled }}
{{- $groups = append $groups (dict "name" "cpu" "spec" $v.workers.cpu "image" (include "cloudburst.cpuImage" $root) "gpus" 0) }}
{{- end }}
{{- if $v.workers.gpu.enabled }}
{{- $groups = append $groups (dict "name" "gpu" "spec" $v.workers.gpu "image" (include "cloudburst.gpuImage" $root) "gpus" $v.workers.gpu.gpus) }}
{{- end }}
{{- if $groups }}
workerGroupSpecs:
{{- range $groups }}
{{- $g := .spec }}
{{- if gt (int $g.minReplicas) (int $g.maxReplicas) }}
{{- fail (printf "workers.%s: minReplicas (%d) is above maxReplicas (%d)" .name (int $g.minReplicas) (int $g.maxReplicas)) }}
{{- end }}
  - groupName: {{ .name }}
    replicas: {{ int $g.replicas }}
    minReplicas: {{ int $g.minReplicas }}
    maxReplicas: {{ int $g.maxReplicas }}
    rayStartParams:
      {{- toYaml $g.rayStartParams | nindent 6 }}
    template:
      {{- include "cloudburst.rayPodTemplate" (dict "root" $root "kind" "worker" "image" .image "resources" $g.resources "gpus" .gpus "nodeSelector" $g.nodeSelector "tolerations" $g.tolerations "serve" $.serve) | nindent 6 }}
{{- end }}
{{- else }}
workerGroupSpecs: []
{{- end }}
{{- end -}}

{{/* The entrypoint of a RayJob: the job's command line. Arguments: root, job. */}}
{{- define "cloudburst.entrypoint" -}}
{{- $root := .root -}}
{{- $v := $root.Values.jobs -}}
{{- $configs := include "cloudburst.configsPath" $root -}}
{{- $words := list "python" (printf "jobs/%s.py" .job) -}}
{{- if or (eq .job "train") (eq .job "sweep") -}}
{{- $cfg := (get $v .job).config -}}
{{- $text := $root.Files.Get (printf "configs/%s" $cfg) -}}
{{- if not $text -}}
{{- fail (printf "jobs.%s.config: %s is not one of the chart's configs (configs/, a copy of jobs/configs)" .job $cfg) -}}
{{- end -}}
{{- $words = concat $words (list "--config" (printf "%s/%s" $configs $cfg)) -}}
{{- range (get $v .job).overrides -}}
{{- $words = append $words (squote .) -}}
{{- end -}}
{{- if eq .job "sweep" -}}
{{- $base := (fromYaml $text).base -}}
{{- if not ($root.Files.Get (printf "configs/%s" (base $base))) -}}
{{- fail (printf "jobs.sweep.config: its base %s is not one of the chart's configs" $base) -}}
{{- end -}}
{{- $words = append $words (squote (printf "base=%s/%s" $configs (base $base))) -}}
{{- end -}}
{{- else if eq .job "ensemble" -}}
{{- $words = concat $words (list "--request" (printf "%s/ensemble.yaml" (include "cloudburst.requestsPath" $root)) "--workers" (squote (toString $v.ensemble.workers))) -}}
{{- else if eq .job "evaluate" -}}
{{- $e := $v.evaluate -}}
{{- if and (not $e.models) (not $e.ensembles) -}}
{{- fail "jobs.evaluate: give at least one of models or ensembles" -}}
{{- end -}}
{{- range $e.models }}{{ $words = concat $words (list "--model" (squote .)) }}{{ end -}}
{{- range $e.ensembles }}{{ $words = concat $words (list "--ensemble" (squote .)) }}{{ end -}}
{{- $words = concat $words (list "--data" (squote (required "jobs.evaluate.data: name the store of observations" $e.data)) "--split" (squote $e.split) "--out" (squote $e.out)) -}}
{{- range $e.args }}{{ $words = append $words (squote .) }}{{ end -}}
{{- end -}}
{{- join " " $words -}}
{{- end -}}

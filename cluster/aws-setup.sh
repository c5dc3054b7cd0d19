#!/usr/bin/env bash
# Least-privilege AWS set-up for cluster/aws.yaml, once per account (needs the aws CLI and IAM/EC2
# rights in your shell):
#
#   cluster/aws-setup.sh BUCKET SSH_CIDR      e.g.  cluster/aws-setup.sh my-msprior 203.0.113.7/32
#
# - roles msprior-head and msprior-worker (+ instance profiles) with the policies of cluster/iam/:
#   the head may launch, tag and stop only this cluster's instances, pass only msprior-worker and use
#   only BUCKET; the workers may use only BUCKET;
# - security group msprior-nodes in the default VPC of aws.yaml's region: all traffic between its
#   members, SSH (22) from SSH_CIDR only (nothing else from outside: the dashboard stays on the
#   head's loopback, reached through `ray dashboard`);
# - placement group msprior-train (strategy cluster) and a subnet in ${region}a for gpu_8x's EFA;
# - cluster/aws.local.yaml: aws.yaml with your account, that group, subnet and BUCKET filled in
#   (`ray up` it).
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "aws-setup.sh: $*" >&2; exit 2; }
bucket="${1:-}"; cidr="${2:-}"
[ $# -eq 2 ] || die "usage: cluster/aws-setup.sh BUCKET SSH_CIDR (e.g. my-msprior 203.0.113.7/32)"
[[ "$bucket" =~ ^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$ ]] || die "BUCKET $bucket: not an S3 bucket name"
[[ "$cidr" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}/([0-9]|[12][0-9]|3[0-2])$ ]] \
  || die "SSH_CIDR $cidr: an IPv4 CIDR, e.g. 203.0.113.7/32 (your address)"
[ "${cidr#*/}" -ge 16 ] || die "SSH_CIDR $cidr: wider than /16; give your own address or network (e.g. 203.0.113.7/32)"
region="$(sed -n 's/^  region: *//p' cluster/aws.yaml)"
account="$(aws sts get-caller-identity --query Account --output text)"
fill() { sed -e "s/BUCKET/$bucket/g" -e "s/ACCOUNT_ID/$account/g" -e "s/REGION/$region/g" "$1"; }
trust='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}'
for node in head worker; do
  policy="cluster/iam/msprior-head-policy.json"
  [ "$node" = head ] || policy="cluster/iam/msprior-node-policy.json"
  aws iam get-role --role-name "msprior-$node" >/dev/null 2>&1 \
    || aws iam create-role --role-name "msprior-$node" --assume-role-policy-document "$trust" >/dev/null
  aws iam put-role-policy --role-name "msprior-$node" --policy-name "msprior-$node" --policy-document "$(fill "$policy")"
  if ! aws iam get-instance-profile --instance-profile-name "msprior-$node" >/dev/null 2>&1; then
    aws iam create-instance-profile --instance-profile-name "msprior-$node" >/dev/null
    aws iam add-role-to-instance-profile --instance-profile-name "msprior-$node" --role-name "msprior-$node"
  fi
done
vpc="$(aws ec2 describe-vpcs --region "$region" --filters Name=isDefault,Values=true --query 'Vpcs[0].VpcId' --output text)"
sg="$(aws ec2 describe-security-groups --region "$region" --filters Name=group-name,Values=msprior-nodes \
      "Name=vpc-id,Values=$vpc" --query 'SecurityGroups[0].GroupId' --output text)"
if [ "$sg" = None ] || [ -z "$sg" ]; then
  sg="$(aws ec2 create-security-group --region "$region" --group-name msprior-nodes --vpc-id "$vpc" \
        --description "msprior Ray nodes: intra-cluster + SSH from one CIDR" --query GroupId --output text)"
  aws ec2 authorize-security-group-ingress --region "$region" --group-id "$sg" \
    --ip-permissions "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$sg}]" >/dev/null
fi
aws ec2 authorize-security-group-ingress --region "$region" --group-id "$sg" \
  --ip-permissions "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=$cidr}]" >/dev/null 2>&1 \
  || echo "aws-setup.sh: SSH from $cidr already allowed in $sg" >&2
# gpu_8x (8 nodes x 8 GPUs): a cluster placement group (one network spine, one AZ) and a subnet of
# the default VPC in that AZ for its EFA interfaces. Creating them costs nothing until nodes launch.
az="${region}a"
subnet="$(aws ec2 describe-subnets --region "$region" --filters "Name=vpc-id,Values=$vpc" \
          "Name=availability-zone,Values=$az" --query 'Subnets[0].SubnetId' --output text)"
{ [ -n "$subnet" ] && [ "$subnet" != None ]; } || die "no subnet of $vpc in $az for the gpu_8x nodes"
aws ec2 describe-placement-groups --region "$region" --group-names msprior-train >/dev/null 2>&1 \
  || aws ec2 create-placement-group --region "$region" --group-name msprior-train --strategy cluster >/dev/null
out="${AWS_LOCAL_YAML:-cluster/aws.local.yaml}"
sed -e "s/ACCOUNT_ID/$account/g" -e "s/sg-MSPRIOR/$sg/g" -e "s/subnet-MSPRIOR/$subnet/g" \
  -e "s#s3://BUCKET/#s3://$bucket/#g" cluster/aws.yaml > "$out"
echo "wrote $out (account $account, security group $sg, subnet $subnet, bucket $bucket, SSH from $cidr): ray up -y $out" >&2
